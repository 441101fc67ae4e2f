"""Real data (--data): LLaVA-format records + an image folder + depth / mask folders in the
UniMRG release's layout, built in tmp_path: preprocessing (DESIGN.md 6), skip counters by
reason, determinism, sharding over ranks and workers, the missing-folder messages, and a
short training run with a tiny local Qwen2 and its tokenizer."""
from __future__ import annotations

import collections
import io
import json
import math
import multiprocessing
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import checkpoint as ckpt
from trainer import realdata, scenes
from trainer.__main__ import main
from trainer.config import TASKS, ConfigError
from trainer.data import TASK_ID, Sample, SampleFactory
from trainer.datapaths import SEG_STYLE_FILE, DataPathError, resolve, target_path
from trainer.loop import train
from trainer.model import HFTextTokenizer
from trainer.records import RecordStore
from trainer.realdata import (GREY, REAL_PROMPTS, RealSource, RecordDataset, Skipped,
                              conversation_turns, depth_target, gen_image, pad_to_square,
                              seg_target, to_rgb, und_image)
from trainer.tokenizers import PatchLatents, image_to_unit
from trainer_helpers import small_config, train_rows

SIZE = 16          # the small config's image size
RED, BLUE = (200, 30, 30), (30, 30, 200)
MASK_COLOURS = ((0, 0, 0), (255, 0, 0), (0, 255, 0), (255, 255, 255))


class StubTokenizer:
    """Any tokenizer with encode(): one id per whitespace-separated word, hashed."""
    bos_id, eos_id, pad_id, img_id, vocab_size = None, 1, 0, 0, 64

    def encode(self, text):
        return [2 + sum(map(ord, w)) % 62 for w in text.split()]


def two_tone(w, h):
    """Top half red, bottom half blue: a stretch keeps both, a grey pad adds grey."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2] = RED
    a[h // 2:] = BLUE
    return a


def mask_image(w, h):
    rng = np.random.default_rng(w * 100 + h)
    return np.array(MASK_COLOURS, np.uint8)[rng.integers(0, len(MASK_COLOURS), (h, w))]


def depth_image(w, h, low=50, high=200):
    ramp = np.linspace(low, high, w)[None].repeat(h, 0)
    return np.rint(ramp).astype(np.uint8)


RECORDS = [  # (record, what happens to it)
    {"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the top?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And the bottom?"}, {"from": "gpt", "value": "Blue."}]},
    {"id": "b", "image": "sub/b.jpg", "conversations": [
        {"from": "human", "value": "Describe <image>"}, {"from": "gpt", "value": "Two halves."}]},
    {"id": "corrupt", "image": "corrupt.jpg", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    {"id": "missing", "image": "nope.png", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    None,  # a malformed JSON line
    {"id": "text-only", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    {"id": "c", "image": "c.png", "conversations": [   # no depth, no mask target
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Shapes."}]},
    {"id": "d", "image": "d.png", "conversations": []},   # no conversation: gen only
]
# Expected skips with the unimrg cycle (und, pixel, depth, seg).
EXPECTED_SKIPS = {"bad_image": 1, "missing_image": 1, "bad_json": 1, "no_image": 1,
                  "missing_depth": 1, "missing_mask": 1, "no_conversation": 1}
# Samples per task: a, b, c, d give pixel; a, b, d depth and seg; a, b, c und.
EXPECTED_SAMPLES = {"und": 3, "pixel": 4, "depth": 3, "seg": 3}


def make_dataset(tmp_path) -> Path:
    """The small data set (release layout) the tests train on: RECORDS, their images and
    targets, and the broken ones."""
    root = tmp_path / "data"
    images = root / "tuning_data"
    depth, mask = root / "tuning_data_depth", root / "tuning_data_mask"
    for folder in (images / "sub", depth / "sub", mask / "sub"):
        folder.mkdir(parents=True)
    Image.fromarray(two_tone(30, 20)).save(images / "a.png")
    Image.fromarray(two_tone(18, 40)).save(images / "sub" / "b.jpg", quality=95)
    Image.fromarray(two_tone(24, 24)).save(images / "c.png")
    Image.fromarray(two_tone(21, 33)).save(images / "d.png")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for rel, (w, h) in {"a": (30, 20), "sub/b": (18, 40), "d": (21, 33)}.items():
        Image.fromarray(depth_image(w, h)).save(depth / f"{rel}.png")
        Image.fromarray(mask_image(w, h)).save(mask / f"{rel}.png")
    lines = [json.dumps(r) if r is not None else '{"id": "broken", "image": ' for r in RECORDS]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n\n")
    return root


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    return make_dataset(tmp_path)


def factory_for(tmp_path, **overrides):
    config = small_config(tmp_path, family=overrides.pop("family", "mar"), **overrides)
    m = config.model
    images = PatchLatents(m.image_size, m.patch, None)   # identity: latents are the pixels
    return SampleFactory(config, StubTokenizer(), images, (m.image_size // m.vit_patch) ** 2)


def dataset_for(tmp_path, root, cycle=("und", "pixel", "depth", "seg"), **kwargs):
    kwargs.setdefault("pack_tokens", 256)
    kwargs.setdefault("shuffle", False)   # file order: the tests below name records by place
    factory = factory_for(tmp_path)
    paths = resolve(str(root / "train.jsonl"), tasks=cycle)
    return RecordDataset(factory, paths, cycle, **kwargs)


def items_of(dataset, epochs=1):
    dataset.epochs = epochs
    return list(iter(dataset))


def latents_image(sample: Sample) -> np.ndarray:
    """The target image back from identity patch latents: [S, S, 3] in [-1, 1]."""
    n, p = SIZE // 4, 4
    x = torch.from_numpy(sample.latents).reshape(n, n, p, p, 3).permute(0, 2, 1, 3, 4)
    return x.reshape(SIZE, SIZE, 3).numpy()


# ------------------------------------------------------------------------ preprocessing
def test_und_images_are_padded_grey_and_gen_images_stretched():
    wide = Image.fromarray(two_tone(30, 20))
    square = np.asarray(pad_to_square(wide))
    assert square.shape == (30, 30, 3)
    assert (square[:5] == GREY).all() and (square[-5:] == GREY).all()   # 5 grey rows each side
    assert (square[5:15] == RED).all() and (square[15:25] == BLUE).all()
    und = und_image(wide, SIZE)
    assert und.shape == (SIZE, SIZE, 3) and und.dtype == np.uint8
    assert (und[0] == GREY).all() and (und[-1] == GREY).all()
    gen = gen_image(wide, SIZE)
    assert gen.shape == (SIZE, SIZE, 3)
    assert np.abs(gen[0].astype(int) - RED).max() <= 2
    assert np.abs(gen[-1].astype(int) - BLUE).max() <= 2
    tall = und_image(Image.fromarray(two_tone(10, 40)), SIZE)       # padded left and right
    assert (tall[:, 0] == GREY).all() and (tall[:, -1] == GREY).all()


def test_depth_is_min_max_normalised_to_minus_one_one_on_three_channels():
    for raw in (Image.fromarray(depth_image(30, 20, 50, 200)),
                Image.fromarray((np.linspace(1000, 40000, 600).reshape(20, 30)).astype(np.uint16)),
                Image.fromarray(np.repeat(depth_image(30, 20, 10, 90)[..., None], 3, -1))):
        out = depth_target(raw, SIZE)
        assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32
        assert out.min() == pytest.approx(-1.0) and out.max() == pytest.approx(1.0)
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
        assert (np.diff(out[0, :, 0]) > 0).all()      # the ramp survives, increasing
    flat = depth_target(Image.fromarray(np.full((8, 8), 77, np.uint8)), SIZE)
    assert (flat == -1.0).all()


def test_seg_is_resized_nearest_neighbour_keeping_only_the_masks_colours():
    raw = mask_image(37, 23)
    out = seg_target(Image.fromarray(raw), SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    assert colours <= set(MASK_COLOURS) and len(colours) >= 3


def test_conversations_give_every_turn_without_the_image_token():
    turns = conversation_turns(RECORDS[0])
    assert [(t.question, t.answer) for t in turns] == [("What colour is the top?", "Red."),
                                                       ("And the bottom?", "Blue.")]
    assert conversation_turns({"conversations": [{"from": "gpt", "value": "x"}]}) == []


def test_chat_template_roles_and_consecutive_questions():
    # user / assistant (any case) dropped every turn, and with it the und task, silently;
    # a second human turn in a row overwrote the first (usually the instruction)
    record = {"conversations": [
        {"from": "User", "value": "<image>\nDescribe the shapes."},
        {"from": "user", "value": "Which is on top?"},
        {"from": "ASSISTANT", "value": "The red one."},
        {"from": "system", "value": "ignored"},
        {"from": "Human", "value": "And below?"}, {"from": "GPT", "value": "Blue."}]}
    assert [(t.question, t.answer) for t in conversation_turns(record)] == [
        ("Describe the shapes.\nWhich is on top?", "The red one."), ("And below?", "Blue.")]


def test_samples_carry_the_preprocessed_images_and_answer_only_labels(tmp_path, dataset_dir):
    items = items_of(dataset_for(tmp_path, dataset_dir))
    samples = {(s.source.split(":")[1], TASKS[s.task]): s for s in items if isinstance(s, Sample)}
    und = samples[("a", "und")]
    assert (und.cond_image[0] == GREY).all()                 # padded
    tok = StubTokenizer()
    answers = tok.encode("Red.") + [tok.eos_id] + tok.encode("Blue.") + [tok.eos_id]
    assert und.label_ids.tolist() == answers                 # answers (and eos) only
    assert (und.input_ids[und.label_rows + 1] == und.label_ids).all()
    assert und.spans == ((16, "full"), (und.length - 16, "causal"))
    pixel = samples[("a", "pixel")]
    assert not (pixel.cond_image[0] == GREY).all()           # stretched, not padded
    np.testing.assert_allclose(latents_image(pixel), image_to_unit(pixel.cond_image), atol=1e-6)
    depth = latents_image(samples[("a", "depth")])
    assert depth.min() == pytest.approx(-1) and depth.max() == pytest.approx(1)
    seg = latents_image(samples[("b", "seg")])
    allowed = {tuple(np.float32(c) / np.float32(127.5) - 1) for c in MASK_COLOURS}
    assert {tuple(c) for c in seg.reshape(-1, 3)} <= allowed
    for (rec, task), s in samples.items():
        if task != "und":
            assert s.latents.min() >= -1 and s.latents.max() <= 1, (rec, task)
            prompt = s.input_ids[16:s.target_start].tolist()
            assert prompt in [tok.encode(p) for p in REAL_PROMPTS[task]], (rec, task)


# ----------------------------------------------------------------- skips, determinism
def test_bad_records_are_skipped_and_counted_by_reason(tmp_path, dataset_dir):
    items = items_of(dataset_for(tmp_path, dataset_dir))
    skips = collections.Counter(i.reason for i in items if isinstance(i, Skipped))
    assert dict(skips) == EXPECTED_SKIPS
    tasks = collections.Counter(TASKS[i.task] for i in items if isinstance(i, Sample))
    assert dict(tasks) == EXPECTED_SAMPLES


def test_a_missing_target_is_counted_once_a_record_with_two_seg_samples(tmp_path, dataset_dir):
    # sgt's cycle asks two seg samples of each record: c has no mask, counted once
    items = items_of(dataset_for(tmp_path, dataset_dir, cycle=("seg", "seg", "und")))
    skips = collections.Counter(i.reason for i in items if isinstance(i, Skipped))
    assert skips["missing_mask"] == 1, skips
    seg = collections.Counter(i.source.split(":")[1] for i in items
                              if isinstance(i, Sample) and TASKS[i.task] == "seg")
    assert seg == {"a": 2, "b": 2, "d": 2}


def test_a_json_list_gives_the_same_samples_as_json_lines(tmp_path, dataset_dir):
    records = [r for r in RECORDS if r is not None] + ["not a record"]
    (dataset_dir / "train.json").write_text(json.dumps(records, indent=1))
    (dataset_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = items_of(dataset_for(tmp_path, dataset_dir))
    factory = factory_for(tmp_path)
    cycle = ("und", "pixel", "depth", "seg")
    listed = RecordDataset(factory, resolve(str(dataset_dir / "train.json"), tasks=cycle), cycle,
                           pack_tokens=256, epochs=1, shuffle=False)
    assert listed.store.is_list and len(listed.store) == len(records)
    assert [_key(i) for i in listed] == [_key(i) for i in lines]
    skips = collections.Counter(i.reason for i in lines if isinstance(i, Skipped))
    assert skips["bad_json"] == 1                       # the string record


def test_long_conversations_drop_turns_then_skip(tmp_path, dataset_dir):
    # 16 image tokens + the first turn fit in 16 + 7 tokens; both turns do not
    items = items_of(dataset_for(tmp_path, dataset_dir, cycle=("und",), pack_tokens=16 + 7))
    und = {i.source.split(":")[1]: i for i in items if isinstance(i, Sample)}
    assert und["a"].label_ids.tolist() == StubTokenizer().encode("Red.") + [1]
    too_long = items_of(dataset_for(tmp_path, dataset_dir, cycle=("und",), pack_tokens=17))
    reasons = collections.Counter(i.reason for i in too_long if isinstance(i, Skipped))
    assert reasons["too_long"] == 3


def test_dropping_turns_tokenises_each_turn_once(tmp_path, dataset_dir, monkeypatch):
    """A conversation longer than a pack is cut after its last turn that fits, found in one
    pass: no turn is tokenised again for every shorter prefix tried."""
    seen = collections.Counter()
    encode = StubTokenizer.encode
    monkeypatch.setattr(StubTokenizer, "encode", lambda self, text: seen.update([text]) or encode(self, text))
    items = items_of(dataset_for(tmp_path, dataset_dir, cycle=("und",), pack_tokens=16 + 7))
    assert any(isinstance(i, Sample) and i.source.endswith(":a") for i in items)
    # record a's first turn fits, its second does not (test above)
    assert seen["What colour is the top?"] == seen["Red."] == 1
    assert seen["And the bottom?"] <= 1


def _key(item):
    if isinstance(item, Skipped):
        return ("skip", item.reason, item.source)
    return (item.source, item.task, item.input_ids.tobytes(), item.latents.tobytes()
            if item.latents is not None else b"", item.scored.tobytes() if item.scored is not None
            else b"", item.eps.tobytes() if item.eps is not None else b"")


def test_samples_are_a_function_of_the_seed(tmp_path, dataset_dir):
    a = [_key(i) for i in items_of(dataset_for(tmp_path, dataset_dir, seed=1))]
    b = [_key(i) for i in items_of(dataset_for(tmp_path, dataset_dir, seed=1))]
    c = [_key(i) for i in items_of(dataset_for(tmp_path, dataset_dir, seed=2))]
    assert a == b and a != c
    two = [_key(i) for i in items_of(dataset_for(tmp_path, dataset_dir, seed=1), epochs=2)]
    assert two[:len(a)] == a and two[len(a):] != a     # epoch 2: fresh masks and noise
    assert [k[:2] for k in two[len(a):]] == [k[:2] for k in a]


def test_ranks_and_workers_see_disjoint_records_that_cover_the_file(tmp_path, dataset_dir):
    seen = {}
    for rank in range(2):
        dataset = dataset_for(tmp_path, dataset_dir, rank=rank, world_size=2, epochs=1)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2,
                                             collate_fn=lambda x: x)
        items = list(loader)
        keys = [(i.source, i.reason if isinstance(i, Skipped) else i.task) for i in items]
        assert len(keys) == len(set(keys)), f"rank {rank}: a record was read twice: {keys}"
        seen[rank] = {int(i.source.split(":")[0].replace("record ", "")) for i in items}
    assert not seen[0] & seen[1], seen
    assert seen[0] | seen[1] == set(range(len(RECORDS))), seen
    # 4 shards: record i goes to shard i % 4 = rank * 2 + worker
    assert seen[0] == {i for i in range(len(RECORDS)) if i % 4 < 2}


def _many(root: Path, n: int) -> Path:
    """n records that share a.png: cheap pixel samples, one per record."""
    path = root / "many.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "image": "a.png"}) + "\n"
                            for i in range(n)))
    return path


def _record_order(items):
    return [int(i.source.split(":")[0]) for i in items]


def test_every_epoch_visits_the_records_in_a_fresh_seeded_order(tmp_path, dataset_dir):
    paths = resolve(str(_many(dataset_dir, 24)), tasks=("pixel",))

    def order(seed, epochs, shuffle=True):
        return _record_order(RecordDataset(factory_for(tmp_path), paths, ("pixel",), seed=seed,
                                           pack_tokens=256, epochs=epochs, shuffle=shuffle))

    two = order(1, 2)
    first, second = two[:24], two[24:]
    assert sorted(first) == sorted(second) == list(range(24))   # each record once an epoch
    assert first != list(range(24)) and second != first
    assert order(1, 2) == two and order(2, 1) != first
    assert order(1, 2, shuffle=False) == list(range(24)) * 2


def test_shuffled_shards_of_ranks_and_workers_are_disjoint_and_cover_the_file(tmp_path,
                                                                              dataset_dir):
    paths = resolve(str(_many(dataset_dir, 24)), tasks=("pixel",))
    seen = {}
    for rank in range(2):
        dataset = RecordDataset(factory_for(tmp_path), paths, ("pixel",), seed=5, rank=rank,
                                world_size=2, pack_tokens=256, epochs=1)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2,
                                             collate_fn=lambda x: x)
        order = _record_order(loader)
        assert len(order) == len(set(order)) == 12, order
        seen[rank] = set(order)
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(24))
    assert seen[0] != {i for i in range(24) if i % 4 < 2}   # not the file-order split


def test_a_shuffled_reader_whose_share_gave_nothing_reads_on(tmp_path, dataset_dir):
    # 4 ranks of 2 records: a rank whose first share is two bad records gets good ones in
    # a later epoch (before, it ended after the first, as a reader in file order does)
    good = {"a", "b", "c", "d"}

    def epochs_of(rank, shuffle, epochs=12):
        dataset = dataset_for(tmp_path, dataset_dir, rank=rank, world_size=4, epochs=epochs,
                              shuffle=shuffle, seed=0)
        return {i.source.split(":")[1] for i in dataset if isinstance(i, Sample)}

    barren_first = [r for r in range(4) if not epochs_of(r, True, epochs=1)]
    assert barren_first, "no rank's first share is all bad at this seed: pick another"
    for rank in barren_first:
        assert epochs_of(rank, True) & good


def test_the_shuffle_setting_reaches_the_data_set(tmp_path, dataset_dir):
    llm = tmp_path / "fake-llm"
    llm.mkdir()
    data = str(dataset_dir / "train.jsonl")
    for kwargs, want in (({}, True), ({"shuffle": False}, False)):
        config = small_config(tmp_path, data=data, llm=str(llm), **kwargs)
        assert RealSource(config, factory_for(tmp_path)).dataset.shuffle is want


# ------------------------------------------------------------------ configuration, CLI
def _tiny_llm(tmp_path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = sorted({w.lower() for r in RECORDS if r for m in r.get("conversations", [])
                    for w in m["value"].split()} | {w for p in scenes.PROMPTS.values()
                                                     for t in p for w in t.split()}
                   | {w for p in REAL_PROMPTS.values() for t in p
                      for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t)})
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", unk_token="<unk>")
    path = tmp_path / "llm"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=16)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_default_folders_follow_the_release_layout(dataset_dir):
    paths = resolve(str(dataset_dir), tasks=TASKS)       # the folder holding the .jsonl
    assert paths.records == str(dataset_dir / "train.jsonl")
    assert Path(paths.images) == dataset_dir / "tuning_data"
    assert Path(paths.depth) == dataset_dir / "tuning_data_depth"
    assert Path(paths.mask) == dataset_dir / "tuning_data_mask"


@pytest.mark.parametrize("breakage, args, flag, words", [
    ("images", [], "--images", "tuning_data"),
    ("depth", [], "--depth-dir", "trainer.prepare"),
    ("mask", [], "--mask-dir", "trainer.prepare"),
    (None, ["--images", "/no/such/images"], "--images", "no such folder"),
    (None, ["--depth-dir", "/no/such/depth"], "--depth-dir", "/no/such/depth"),
    ("json", [], "--data", "no such file"),
], ids=["images", "depth", "mask", "images-flag", "depth-flag", "data"])
def test_missing_folders_exit_2_naming_the_flag(tmp_path, dataset_dir, capsys, breakage, args,
                                                flag, words):
    llm = tmp_path / "fake-llm"
    llm.mkdir()
    moved = {"images": "tuning_data", "depth": "tuning_data_depth", "mask": "tuning_data_mask"}
    if breakage in moved:
        (dataset_dir / moved[breakage]).rename(dataset_dir / f"gone_{breakage}")
    data = dataset_dir / ("nothing.jsonl" if breakage == "json" else "train.jsonl")
    with pytest.raises(SystemExit) as info:
        main(["--data", str(data), "--llm", str(llm), "--out", str(tmp_path / "runs"), *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and words in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag", ["--depth-dir", "--mask-dir"])
def test_a_target_folder_that_is_the_image_folder_is_refused(dataset_dir, flag):
    images = str(dataset_dir / "tuning_data")
    given = {"depth_dir": images} if flag == "--depth-dir" else {"mask_dir": images}
    with pytest.raises(DataPathError, match=f"{flag}: .*is the image folder itself"):
        resolve(str(dataset_dir / "train.jsonl"), tasks=("depth", "seg"), **given)


def test_depth_folder_is_not_needed_without_the_depth_task(tmp_path, dataset_dir):
    (dataset_dir / "tuning_data_depth").rename(dataset_dir / "elsewhere")
    llm = tmp_path / "fake-llm"
    llm.mkdir()
    config = small_config(tmp_path, data=str(dataset_dir), llm=str(llm), tasks="und,seg")
    assert config.data.data == str(dataset_dir)
    with pytest.raises(ConfigError, match="--depth-dir"):
        small_config(tmp_path, data=str(dataset_dir), llm=str(llm))


def test_real_data_needs_a_real_tokenizer(tmp_path, dataset_dir):
    with pytest.raises(ConfigError, match="--llm"):
        small_config(tmp_path, data=str(dataset_dir))


@pytest.mark.parametrize("family, schedule, workers, evals", [
    ("mar", "interleaved", 2, 0), ("flow", "round-robin", 0, 0), ("ar", "interleaved", 0, 1)])
def test_training_on_real_data_gives_finite_losses(tmp_path, dataset_dir, family, schedule,
                                                   workers, evals):
    llm = _tiny_llm(tmp_path)
    config = small_config(tmp_path, llm=str(llm), data=str(dataset_dir / "train.jsonl"),
                          family=family, num_workers=workers, schedule=schedule, steps=3,
                          eval_questions=2 * evals, eval_scenes=evals, pack_tokens=256)
    rows = train_rows(train(config))
    assert [r["step"] for r in rows] == [1, 2, 3]
    for task in TASKS:
        values = [r[f"loss/{task}"] for r in rows if r.get(f"loss/{task}") is not None]
        assert values and all(math.isfinite(v) for v in values), (task, rows)
    last = rows[-1]
    assert last["skipped/bad_image"] >= 1 and last["skipped/bad_json"] >= 1, last
    assert set(k for k in last if k.startswith("skipped/")) <= \
        {f"skipped/{r}" for r in EXPECTED_SKIPS} | {"skipped/surplus"}
    assert {k[len("skipped/"):] for k in last if k.startswith("skipped/")} <= \
        set(realdata.SKIP_REASONS), "a skip reason SKIP_REASONS does not list"
    # the data workers stopped with the run, not at some later garbage collection
    assert multiprocessing.active_children() == []


def test_the_data_workers_stop_when_train_fails_and_no_global_rng_is_drawn(
        tmp_path, dataset_dir, monkeypatch):
    import gc

    from trainer import loop

    def fail_at_step_2(*args, **kwargs):   # the first optimizer step, then a crash
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    calls, original = [], loop.optimizer_step
    monkeypatch.setattr(loop, "optimizer_step", fail_at_step_2)
    llm = _tiny_llm(tmp_path)
    config = small_config(tmp_path, llm=str(llm), data=str(dataset_dir / "train.jsonl"),
                          num_workers=2, steps=3, pack_tokens=256)
    gc.disable()   # the workers must stop without the collector's help
    try:
        with pytest.raises(RuntimeError, match="boom") as info:
            train(config)
        assert multiprocessing.active_children() == []
    finally:
        gc.enable()
    del info
    # starting the workers draws their base seed from the loader's own generator: a
    # resumed run, whose RNG states were just restored, would otherwise be a draw ahead
    source = _source(tmp_path, dataset_dir, workers=2)
    before = torch.get_rng_state()
    source.next_sample("und")
    assert torch.equal(torch.get_rng_state(), before)
    source.close()
    assert multiprocessing.active_children() == []


def _source(tmp_path, dataset_dir, workers, schedule="interleaved", state=None, shuffle=True):
    llm = tmp_path / "fake-llm"
    llm.mkdir(exist_ok=True)
    config = small_config(tmp_path, llm=str(llm), data=str(dataset_dir / "train.jsonl"),
                          num_workers=workers, schedule=schedule, seed=3, shuffle=shuffle)
    source = RealSource(config, factory_for(tmp_path))
    if state is not None:
        assert source.load_state_dict(state)
    return source


@pytest.mark.parametrize("workers, schedule", [(0, "interleaved"), (2, "interleaved"),
                                               (2, "round-robin")])
def test_a_restored_source_continues_the_identical_sample_stream(tmp_path, dataset_dir,
                                                                 workers, schedule):
    # shuffled, over epochs, cut mid-record and at every reader's turn
    tasks = ["und", "pixel", "depth", "seg"] * 20
    straight = _source(tmp_path, dataset_dir, workers, schedule)
    want = [_key(straight.next_sample(t)) for t in tasks]
    for cut in (1, 6, 13, 30):
        first = _source(tmp_path, dataset_dir, workers, schedule)
        got = [_key(first.next_sample(t)) for t in tasks[:cut]]
        state = first.state_dict()
        assert state["in_turn"]
        second = _source(tmp_path, dataset_dir, workers, schedule, state=state)
        got += [_key(second.next_sample(t)) for t in tasks[cut:]]
        assert got == want, cut
        assert dict(second.skipped) == dict(straight.skipped), cut


def test_a_source_whose_readers_fell_out_of_turn_is_not_restored(tmp_path, dataset_dir):
    # 3 workers of 8 records in file order: the third reader's (corrupt, text-only) all
    # fail, it ends after its first epoch, the turns break
    source = _source(tmp_path, dataset_dir, 3, shuffle=False)
    for task in ["und", "pixel", "depth", "seg"] * 5:
        source.next_sample(task)
    state = source.state_dict()
    assert not state["in_turn"]
    assert not _source(tmp_path, dataset_dir, 3, shuffle=False).load_state_dict(state)
    assert not _source(tmp_path, dataset_dir, 2).load_state_dict(dict(state, in_turn=True))


def test_a_round_robin_checkpoint_keeps_queued_samples_as_origins(tmp_path, dataset_dir):
    # Asking only for depth and seg piles und / pixel samples up in their queues (c.png
    # has neither target): the state holds their origins, not their images, and a
    # restored source makes them again, identical.
    asked, then = ["depth", "seg"] * 8, ["und", "pixel", "depth", "seg"] * 6
    straight = _source(tmp_path, dataset_dir, 0, "round-robin")
    want = [_key(straight.next_sample(t)) for t in asked + then]
    first = _source(tmp_path, dataset_dir, 0, "round-robin")
    for task in asked:
        first.next_sample(task)
    state = first.state_dict()
    queued = [entry for q in state["queues"].values() for entry in q]
    assert len(queued) >= 8, "the und / pixel queues should have run ahead"
    assert all(isinstance(e, tuple) and len(e) == 3 for e in queued), queued[:3]
    held = sum(s.cond_image.nbytes for q in first.queues.values() for s in q)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert buffer.tell() < held / 4, (buffer.tell(), held)

    restored = _source(tmp_path, dataset_dir, 0, "round-robin", state=state)
    assert [_key(restored.next_sample(t)) for t in then] == want[len(asked):]
    assert dict(restored.skipped) == dict(straight.skipped)
    # a checkpoint written before origins held the samples themselves: still loads
    older = dict(state, queues={task: list(q) for task, q in first.queues.items()})
    from_older = _source(tmp_path, dataset_dir, 0, "round-robin", state=older)
    assert [_key(from_older.next_sample(t)) for t in then] == want[len(asked):]


def test_a_queued_sample_whose_image_vanished_is_skipped_on_restore(tmp_path, dataset_dir):
    first = _source(tmp_path, dataset_dir, 0, "round-robin", shuffle=False)
    for task in ["depth", "seg"] * 4:
        first.next_sample(task)
    state = first.state_dict()
    und = state["queues"][TASK_ID["und"]]
    index = und[0][0]
    gone = json.loads((dataset_dir / "train.jsonl").read_text().splitlines()[index])["image"]
    (dataset_dir / "tuning_data" / gone).unlink()
    restored = _source(tmp_path, dataset_dir, 0, "round-robin", shuffle=False, state=state)
    vanished = sum(1 for entry in und if entry[0] == index)
    assert len(restored.queues[TASK_ID["und"]]) == len(und) - vanished
    assert restored.skipped["missing_image"] == first.skipped["missing_image"] + vanished
    assert all(s.origin[0] != index for s in restored.queues[TASK_ID["und"]])


def test_a_resume_on_changed_records_is_refused_naming_data(tmp_path, dataset_dir):
    """A data position names records by index: records added, dropped or edited since the
    checkpoint would continue (or replay) on other samples, silently."""
    from trainer.data import TrainData

    first = _source(tmp_path, dataset_dir, 0)
    for task in ["und", "depth"] * 3:
        first.next_sample(task)
    state = first.state_dict()
    assert state["records"]["records"] == len(first.dataset.store)
    records = dataset_dir / "train.jsonl"
    text = records.read_text()
    # blank lines and a missing final newline are not records: the same data position
    records.write_text("\n" + text.replace("\n", "\n\n").rstrip("\n"))
    assert _source(tmp_path, dataset_dir, 0).load_state_dict(state)
    lines = text.splitlines(keepends=True)
    edited = json.loads(lines[0])
    edited["conversations"][1]["value"] = "Green."
    for changed, said in ((text + lines[0], "records then"),          # one appended
                          (json.dumps(edited) + "\n" + "".join(lines[1:]), "text differs"),
                          ("".join(lines[1:] + lines[:1]), "text differs")):   # reordered
        records.write_text(changed)
        with pytest.raises(ConfigError, match=f"--data.*changed since the checkpoint.*{said}"):
            _source(tmp_path, dataset_dir, 0).load_state_dict(state)
        # a position the readers cannot continue is replayed instead: refused all the same
        config = small_config(tmp_path, llm=str(tmp_path / "fake-llm"), data=str(records),
                              num_workers=0, seed=3)
        data = TrainData(config, factory_for(tmp_path), pad_id=0)
        saved = {"streams": [None] * (len(data.streams) + 1),
                 "real": dict(state, in_turn=False)}
        with pytest.raises(ConfigError, match="--data.*changed since the checkpoint"):
            data.load_state_dict(saved)
        data.close()
    # a checkpoint written before the fingerprint existed is not checked
    older = {k: v for k, v in state.items() if k != "records"}
    assert _source(tmp_path, dataset_dir, 0).load_state_dict(older) in (True, False)


def test_the_records_fingerprint_sees_each_record_and_its_place_only(tmp_path):
    """Between records (blank lines, a list's separators) does not count; a record's own
    text and its place do."""
    rows = [{"id": i, "image": f"{i}.png", "conversations": []} for i in range(3)]

    def fingerprint(name, text):
        (tmp_path / name).write_text(text)
        return RecordStore(str(tmp_path / name)).fingerprint

    listed = fingerprint("a.json", json.dumps(rows))
    assert listed["records"] == 3
    assert fingerprint("b.json", "[\n\n " + ",\n  ".join(map(json.dumps, rows)) + "\n]\n") == listed
    assert fingerprint("c.json", json.dumps(rows[::-1])) != listed
    lines = fingerprint("d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert fingerprint("e.jsonl", "\n".join(json.dumps(r) for r in rows) + "\r\n\n") == lines
    assert fingerprint("f.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:2])) != lines


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs."""


class _CountingLoad:
    """Counts the images decoded (realdata.load_image) from a point on."""

    def __init__(self, monkeypatch):
        self.count, real = 0, realdata.load_image

        def load(path):
            self.count += 1
            return real(path)

        monkeypatch.setattr(realdata, "load_image", load)


@pytest.mark.parametrize("workers", [0, 2])
def test_real_data_resumes_the_identical_loss_curve_without_rereading(tmp_path, dataset_dir,
                                                                      monkeypatch, workers):
    llm = _tiny_llm(tmp_path)

    def config(name, **kw):
        kw = {"steps": 6, **kw}
        return small_config(tmp_path / name, llm=str(llm), data=str(dataset_dir / "train.jsonl"),
                            family="mar", num_workers=workers, checkpoint_every=3,
                            pack_tokens=256, eval_questions=0, eval_scenes=0, **kw)

    straight = train_rows(train(config("a")))
    real_save = ckpt.save

    def save_then_die(run_dir, **kw):   # a kill right after the step-3 checkpoint
        path = real_save(run_dir, **kw)
        raise _Killed(path)

    monkeypatch.setattr(ckpt, "save", save_then_die)
    with pytest.raises(_Killed) as killed:
        train(config("b"))
    monkeypatch.undo()
    saved = killed.value.args[0]
    state = torch.load(saved / "data-00000.pt", weights_only=False)
    assert state["real"]["in_turn"] and state["real"]["taken_at"]
    if workers == 0:   # in-process readers: the decodes are countable here
        counting = _CountingLoad(monkeypatch)
    resumed = train_rows(train(config("b", resume=str(saved))))
    assert _losses(resumed) == _losses(straight)
    if workers == 0:   # steps 4-6 alone: nothing before the checkpoint decoded again
        monkeypatch.undo()
        fresh = _CountingLoad(monkeypatch)
        train(config("c", steps=3))
        assert 0 < counting.count <= fresh.count + 4, (counting.count, fresh.count)


def _losses(rows):
    return [(r["step"], r["loss"], r.get("loss/und"), r.get("loss/pixel"), r.get("loss/depth"),
             r.get("loss/seg"), r["grad_norm"]) for r in rows]


def test_a_data_set_without_one_usable_record_stops_naming_data(tmp_path, dataset_dir):
    bad = [r for r in RECORDS if r is not None and r["id"] in ("corrupt", "missing", "text-only")]
    (dataset_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    llm = _tiny_llm(tmp_path)
    config = small_config(tmp_path, llm=str(llm), data=str(dataset_dir / "train.jsonl"),
                          num_workers=2, steps=1, eval_questions=0, eval_scenes=0)
    with pytest.raises(ConfigError, match="--data.*no usable sample") as info:
        train(config)
    assert "bad_image" in str(info.value) and "no_image" in str(info.value)


# ------------------------------------------------- prompts, file formats, record shapes
def test_real_prompts_are_the_design_sentences_and_scenes_keep_their_own(tmp_path, dataset_dir):
    assert REAL_PROMPTS["depth"][0] == "Generate the depth map of this image."
    assert REAL_PROMPTS["seg"][0] == "Generate the segmentation mask of this image."
    assert all(len(REAL_PROMPTS[t]) >= 3 for t in ("depth", "seg", "pixel"))
    assert "generate the depth map of this image ." in scenes.PROMPTS["depth"]   # unchanged
    tok = StubTokenizer()
    items = items_of(dataset_for(tmp_path, dataset_dir, cycle=("depth",)))
    real = {tuple(s.input_ids[16:s.target_start]) for s in items if isinstance(s, Sample)}
    assert real and real <= {tuple(tok.encode(p)) for p in REAL_PROMPTS["depth"]}, real
    synthetic = factory_for(tmp_path).train_sample("depth", 0)
    assert synthetic.input_ids[16:synthetic.target_start].tolist() in \
        [tok.encode(p) for p in scenes.PROMPTS["depth"]]


def test_targets_are_looked_up_as_the_release_does(tmp_path, dataset_dir):
    """The image's own relative path first, then .png, then .jpg."""
    depth, mask = dataset_dir / "tuning_data_depth", dataset_dir / "tuning_data_mask"
    # b's targets keep the image's own name; a reversed ramp there wins over b.png's
    Image.fromarray(depth_image(18, 40, 200, 50)).save(depth / "sub" / "b.jpg", format="PNG")
    (mask / "sub" / "b.png").rename(mask / "sub" / "b.jpg")
    Image.fromarray(depth_image(24, 24)).save(depth / "c.jpg", quality=95)   # c: .jpg only
    Image.fromarray(mask_image(24, 24)).save(mask / "c.jpg", format="PNG")
    assert target_path(str(depth), "sub/b.jpg") == os.path.join(str(depth), "sub/b.jpg")
    assert target_path(str(depth), "c.png") == os.path.join(str(depth), "c.jpg")
    assert target_path(str(depth), "a.png") == os.path.join(str(depth), "a.png")
    assert target_path(str(depth), "nope.png") is None
    # a path outside the image folder has no target: joined to the depth folder, both
    # named the photo itself (an absolute path drops the root; tuning_data_depth/../x)
    outside = dataset_dir / "elsewhere.png"
    Image.fromarray(depth_image(8, 8)).save(outside)
    for rel in (str(outside), "../elsewhere.png", "sub/../../elsewhere.png", ".."):
        assert target_path(str(depth), rel) is None, rel
    assert target_path(str(depth), "sub/../a.png") == os.path.join(str(depth), "sub/../a.png")
    items = items_of(dataset_for(tmp_path, dataset_dir))
    skips = collections.Counter(i.reason for i in items if isinstance(i, Skipped))
    assert "missing_depth" not in skips and "missing_mask" not in skips, skips
    b = [s for s in items if isinstance(s, Sample) and s.source.endswith(":b")
         and TASKS[s.task] == "depth"][0]
    assert (np.diff(latents_image(b)[0, :, 0]) < 0).all()     # b.jpg's falling ramp


def test_a_target_named_after_another_image_is_not_taken(tmp_path, dataset_dir):
    # x.gif beside x.png: depth/x.png is x.png's depth map, never x.gif's
    images, depth = dataset_dir / "tuning_data", dataset_dir / "tuning_data_depth"
    Image.fromarray(depth_image(24, 24)).save(images / "x.png")
    Image.fromarray(two_tone(24, 24)).save(images / "x.gif")
    Image.fromarray(depth_image(24, 24)).save(depth / "x.png")
    assert target_path(str(depth), "x.gif") == str(depth / "x.png")   # the release's rule
    assert target_path(str(depth), "x.gif", images=str(images)) is None
    assert target_path(str(depth), "x.png", images=str(images)) == str(depth / "x.png")
    # only a candidate that names another image is passed over: c.png's depth c.jpg stays
    Image.fromarray(depth_image(24, 24)).save(depth / "c.jpg", format="PNG")
    assert target_path(str(depth), "c.png", images=str(images)) == str(depth / "c.jpg")
    # y.tif beside y.jpg: prepare's y.png is y.jpg's (the primary extension owns the stem)
    Image.fromarray(two_tone(24, 24)).save(images / "y.jpg")
    Image.fromarray(two_tone(24, 24)).save(images / "y.tif")
    Image.fromarray(depth_image(24, 24)).save(depth / "y.png")
    assert target_path(str(depth), "y.jpg", images=str(images)) == str(depth / "y.png")
    assert target_path(str(depth), "y.tif", images=str(images)) is None
    # a camera's upper-case extension owns its stem like any other (one listing per folder)
    Image.fromarray(two_tone(24, 24)).save(images / "P.JPG", format="JPEG")
    Image.fromarray(depth_image(24, 24)).save(depth / "P.png")
    assert target_path(str(depth), "P.JPG", images=str(images)) == str(depth / "P.png")


def test_a_depth_map_with_a_non_finite_pixel_is_refused():
    # a NaN min-max gave a constant target, an inf pixel NaN losses (skipped steps)
    for bad in (float("nan"), float("inf")):
        values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
        values[3, 4] = bad
        with pytest.raises(ValueError, match="non-finite"):
            realdata.depth_target(Image.fromarray(values), 8)


def test_fewer_records_than_readers_is_a_config_error(tmp_path, dataset_dir, monkeypatch):
    # a reader without records gives nothing: under torchrun that rank stopped the run with
    # "gave no usable sample (skipped: {})"
    records = [r for r in RECORDS if r is not None][:1]
    path = dataset_dir / "one.json"
    path.write_text(json.dumps(records))
    (dataset_dir / "train.jsonl").unlink()
    monkeypatch.setattr(realdata, "distributed_rank", lambda: (1, 2))
    config = small_config(tmp_path, data=str(path), llm=str(_tiny_llm(tmp_path)))
    with pytest.raises(ConfigError, match=r"--data: .*holds 1 record\(s\): the last of 2 "
                                          r"processes \(x 1 reader\(s\) each"):
        RealSource(config, factory_for(tmp_path))
    # more readers than records in one process is fine: a reader without records just ends
    monkeypatch.setattr(realdata, "distributed_rank", lambda: (0, 1))
    many = small_config(tmp_path, data=str(path), llm=str(tmp_path / "llm"), num_workers=2)
    source = RealSource(many, factory_for(tmp_path))
    try:
        assert source.next_sample("und").task == TASK_ID["und"]
    finally:
        source.close()


def test_a_fifo_named_like_an_image_does_not_block_the_probe(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    assert realdata._readable(str(tmp_path / "pipe.png")) is False


def test_record_text_that_spells_a_special_token_stays_text(tmp_path):
    tok = HFTextTokenizer(str(_tiny_llm(tmp_path)))
    text = "the <|endoftext|> cat"
    assert tok.eos_id in tok.tok.encode(text, add_special_tokens=False)   # the hazard
    assert tok.eos_id not in tok.encode(text), tok.encode(text)


def test_a_json_object_file_is_a_config_error_naming_data(tmp_path, dataset_dir):
    records = [r for r in RECORDS if r is not None]
    path = dataset_dir / "train.json"
    for indent in (1, None):   # pretty-printed, or on one line
        path.write_text(json.dumps({"data": records}, indent=indent))
        with pytest.raises(ConfigError, match=r"--data: .*must be a list of records, got one "
                                              r"JSON object \(keys: data\)"):
            RecordStore(str(path))
    path.write_text(json.dumps(records[0]) + "\n")   # one record on one line: a record
    assert RecordStore(str(path)).get(0) == records[0]
    # JSON Lines in a .json file, first line broken: still JSON Lines, the line counted
    path.write_text("{broken\n" + "".join(json.dumps(r) + "\n" for r in records))
    store = RecordStore(str(path))
    assert store.get(0) is None and store.get(1) == records[0]


def all_records(path):
    store = RecordStore(path)
    return [store.get(i) for i in range(len(store))]


def test_a_json_list_with_a_byte_order_mark_reads_as_without(tmp_path, dataset_dir):
    records = [r for r in RECORDS if r is not None]
    for text in (json.dumps(records, indent=1), json.dumps(records)):
        (dataset_dir / "train.json").write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert all_records(str(dataset_dir / "train.json")) == records


@pytest.mark.parametrize("content", [b'[{"id": "a", "image": "a.png"}, {"id": "b", "ima',
                                     b'[{"id": "a"}] [', b'["caf\xe9"]', b'\xef\xbb\xbf[1,',
                                     b'[' + b'[' * 100_000],
                         ids=["truncated", "trailing", "not-utf8", "bom-truncated",
                              "nested-past-the-stack"])
def test_a_broken_json_list_is_a_config_error_naming_data(tmp_path, dataset_dir, content):
    path = dataset_dir / "train.json"
    path.write_bytes(content)
    (dataset_dir / "train.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"--data: .*train\.json: not valid JSON"):
        RecordStore(str(path))
    llm = tmp_path / "fake-llm"
    llm.mkdir()
    config = small_config(tmp_path, data=str(path), llm=str(llm))
    with pytest.raises(ConfigError, match="--data"):   # what train() builds before step 1
        RealSource(config, factory_for(tmp_path))


def test_a_line_nested_past_the_parsers_stack_is_bad_json_not_a_crash(tmp_path, dataset_dir):
    # json.loads raises RecursionError (not a ValueError) on "[[[[..." deep enough
    lines = (dataset_dir / "train.jsonl").read_text().splitlines(keepends=True)
    lines.insert(1, "[" * 100_000 + "\n")
    (dataset_dir / "train.jsonl").write_text("".join(lines))
    assert RecordStore(str(dataset_dir / "train.jsonl")).get(1) is None
    items = items_of(dataset_for(tmp_path, dataset_dir))
    skips = collections.Counter(i.reason for i in items if isinstance(i, Skipped))
    assert skips["bad_json"] == EXPECTED_SKIPS["bad_json"] + 1
    assert any(isinstance(i, Sample) for i in items)


def test_records_of_unexpected_shapes_are_skipped_never_fatal(tmp_path, dataset_dir,
                                                               monkeypatch):
    odd = [{"id": "n", "image": "a.png", "conversations": 5},
           {"id": "t", "image": "a.png", "conversations": True},
           {"id": "s", "image": "a.png", "conversations": "hello"},
           {"id": "x", "image": "a.png", "conversations": RECORDS[0]["conversations"]}]
    (dataset_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in odd))
    items = items_of(dataset_for(tmp_path, dataset_dir))
    skips = collections.Counter(i.reason for i in items if isinstance(i, Skipped))
    assert dict(skips) == {"no_conversation": 3}                # their images still serve
    tasks = collections.Counter(TASKS[i.task] for i in items if isinstance(i, Sample))
    assert dict(tasks) == {"und": 1, "pixel": 4, "depth": 4, "seg": 4}

    # an error nobody foresaw ends that record as bad_record; the next record is read
    def surprise(record):
        if record["id"] == "t":
            raise KeyError("surprise")
        return original(record)

    original = realdata.conversation_turns
    monkeypatch.setattr(realdata, "conversation_turns", surprise)
    items = items_of(dataset_for(tmp_path, dataset_dir))
    bad = [i for i in items if isinstance(i, Skipped) and i.reason == "bad_record"]
    assert [i.source for i in bad] == ["record 1"]
    assert {i.source.split(":")[1] for i in items if isinstance(i, Sample)} == {"n", "s", "x"}


def test_sixteen_bit_grey_images_are_scaled_not_saturated(tmp_path):
    ramp16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp16).save(path)
    image = realdata.load_image(str(path))
    assert image.mode.startswith("I")
    want = np.rint(ramp16 * (255 / 65535)).astype(np.uint8)
    for wide in (image, Image.fromarray(ramp16.astype(np.int32))):   # I;16 and I
        np.testing.assert_array_equal(np.asarray(to_rgb(wide))[..., 0], want)
    for array in (gen_image(image, SIZE), und_image(image, SIZE)):
        row = array[SIZE // 2, :, 0].astype(int)
        assert (np.diff(row) >= 0).all() and row.max() - row.min() > 200, row
        assert (row < 250).sum() > SIZE // 2, row                    # not white
    eight = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1)))
    for mode in ("I", "F"):          # values already in [0, 255] are kept
        np.testing.assert_array_equal(np.asarray(to_rgb(eight.convert(mode))),
                                      np.asarray(eight.convert("RGB")))
    floats = Image.fromarray(np.linspace(-3.0, 7.0, 64, dtype=np.float32).reshape(8, 8))
    out = np.asarray(to_rgb(floats))[..., 0]
    assert (out.min(), out.max()) == (0, 255)                      # other ranges: min-max
    unit = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(unit)))[..., 0],
                                  np.rint(unit * 255).astype(np.uint8))   # float in [0, 1]


# ------------------------------------------------------------- folders, style, probing
def test_images_given_as_dot_finds_the_folders_prepare_makes(dataset_dir, monkeypatch):
    monkeypatch.chdir(dataset_dir / "tuning_data")
    paths = resolve(str(dataset_dir / "train.jsonl"), ".", tasks=TASKS)
    assert os.path.samefile(paths.depth, dataset_dir / "tuning_data_depth")
    assert os.path.samefile(paths.mask, dataset_dir / "tuning_data_mask")


@pytest.mark.parametrize("folder, flag, elsewhere", [
    ("tuning_data_depth", "--depth-dir", False), ("tuning_data_mask", "--mask-dir", False),
    ("tuning_data_mask", "--mask-dir", True)])
def test_missing_folder_message_gives_a_prepare_command_that_runs(tmp_path, dataset_dir,
                                                                  folder, flag, elsewhere):
    from trainer import prepare as prep

    (dataset_dir / folder).rename(dataset_dir / "gone")
    given = {"mask_dir": str(tmp_path / "masks")} if elsewhere else {}
    with pytest.raises(DataPathError) as info:
        resolve(str(dataset_dir / "train.jsonl"), tasks=TASKS, seg_colour=True, **given)
    assert info.value.flag == flag
    words = shlex.split(str(info.value).split("`")[1])
    assert words[:3] == ["python", "-m", "trainer.prepare"], words
    args = prep.build_parser().parse_args(words[3:])
    model = tmp_path / "model"             # stands in for the checkpoint placeholder
    model.mkdir()
    (model / "config.json").write_text("{}")
    task = "depth" if flag == "--depth-dir" else "seg"
    plan = prep.plan(args.images, depth_out=args.depth_out, seg_out=args.seg_out,
                     depth_model=model, sam_model=model, tasks=args.tasks, device="cpu",
                     seg_style=args.seg_style)
    want = tmp_path / "masks" if elsewhere else dataset_dir / folder
    assert plan.tasks == (task,) and plan.out_dirs[task] == want   # where the trainer looks
    assert task == "depth" or args.seg_style == "sgt"              # the run's style


def test_a_mask_folder_of_the_other_style_is_refused_naming_seg_style(tmp_path, dataset_dir):
    llm = tmp_path / "fake-llm"
    llm.mkdir()
    data = str(dataset_dir / "train.jsonl")
    marker = dataset_dir / "tuning_data_mask" / SEG_STYLE_FILE
    small_config(tmp_path, data=data, llm=str(llm))      # no record of a style: accepted
    marker.write_text(json.dumps({"seg_style": "sgt"}))
    with pytest.raises(ConfigError, match="--seg-style") as info:
        small_config(tmp_path, data=data, llm=str(llm))                 # unimrg: edges
    assert "--seg-style colour" in str(info.value)
    small_config(tmp_path, data=data, llm=str(llm), seg_style="colour")
    small_config(tmp_path, data=data, llm=str(llm), recipe="sgt")       # auto: colour
    small_config(tmp_path, data=data, llm=str(llm), tasks="und,depth")  # no seg trained
    marker.write_text(json.dumps({"seg_style": "unimrg"}))
    with pytest.raises(ConfigError, match="--seg-style"):
        small_config(tmp_path, data=data, llm=str(llm), recipe="sgt")
    small_config(tmp_path, data=data, llm=str(llm), seg_style="edges")


@pytest.mark.parametrize("folder, flag", [("tuning_data_depth", "--depth-dir"),
                                          ("tuning_data_mask", "--mask-dir")])
def test_an_empty_target_folder_stops_before_training(tmp_path, dataset_dir, folder, flag):
    llm = tmp_path / "fake-llm"
    llm.mkdir()
    config = small_config(tmp_path, data=str(dataset_dir / "train.jsonl"), llm=str(llm))
    RealSource(config, factory_for(tmp_path))                        # targets present: fine
    for png in (dataset_dir / folder).rglob("*.png"):
        png.unlink()
    with pytest.raises(ConfigError, match=flag) as info:
        RealSource(config, factory_for(tmp_path))
    assert "python -m trainer.prepare --images" in str(info.value)
    # with the task left out, nothing is probed there
    RealSource(small_config(tmp_path, data=str(dataset_dir / "train.jsonl"), llm=str(llm),
                            tasks="und,pixel"), factory_for(tmp_path))
