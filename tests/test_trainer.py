"""The trainer end to end on a small config (tests/trainer_helpers.py): every family and
recipe learns, the fused and the plain path agree, packs are a function of the seed, a
step with a non-finite loss or gradient is skipped (weights and AdamW untouched) and too
many in a row stop the run cleanly, and the run directory holds what it promises."""
import json
import math

import numpy as np
import pytest
import torch

from trainer import checkpoint as ckpt
from trainer import distributed, report
from trainer import model as model_module
from trainer import scenes
from trainer.config import TASKS, Config
from trainer.data import (SampleFactory, TrainData, eval_scene_seed, train_scene_seed)
from trainer.loop import NonFiniteLoss, optimizer_step, train
from trainer.model import build_model
from trainer_helpers import DECODER_OPS, count_kernel_calls, small_config, train_rows
from unimrg_fast import backends
from unimrg_fast.specs import JointLossOutput

needs_triton = pytest.mark.skipif(not backends.triton().available,
                                  reason=f"Triton cannot run here: {backends.triton().detail}")


def task_losses(rows, task):
    return [r[f"loss/{task}"] for r in rows if r.get(f"loss/{task}") is not None]


def assert_learns(rows, tasks):
    assert rows, "no training rows were logged"
    for task in tasks:
        values = task_losses(rows, task)
        assert len(values) >= 6, f"{task}: only {len(values)} logged losses"
        assert all(math.isfinite(v) for v in values), f"{task}: non-finite losses {values}"
        first, last = np.mean(values[:3]), np.mean(values[-3:])
        assert last < 0.9 * first, f"{task}: loss did not fall ({first:.4f} -> {last:.4f}): {values}"
    for task in set(TASKS) - set(tasks):
        assert not task_losses(rows, task), f"{task} is not in the run but has losses"


@pytest.mark.parametrize("family", ["ar", "mar", "flow"])
def test_every_family_learns_all_four_tasks(tmp_path, family):
    # 20 steps: at 12 the mean of the last 3 losses over the first 3 reached 0.94 for some
    # (family, seed, task) (ar's depth codes, flow's pixels); at 20 it stays <= 0.84 for
    # seeds 0-2 of every family and task, clear of the 0.9 bar
    rows = train_rows(train(small_config(tmp_path, family=family, steps=20)))
    assert_learns(rows, TASKS)


@pytest.mark.parametrize("overrides, tasks", [
    (dict(recipe="sgt"), ("und", "seg")),
    (dict(recipe="sft"), ("und",)),
    (dict(tasks="und,depth"), ("und", "depth")),
    (dict(tasks="seg", family="ar"), ("seg",)),
    (dict(schedule="round-robin"), TASKS),
    (dict(recipe="sgt", schedule="round-robin", family="flow"), ("und", "seg")),
], ids=["sgt", "sft", "tasks-und-depth", "tasks-seg-ar", "round-robin", "sgt-round-robin-flow"])
def test_every_recipe_and_schedule_learns(tmp_path, overrides, tasks):
    rows = train_rows(train(small_config(tmp_path, **overrides)))
    assert_learns(rows, tasks)


def test_sgt_mixes_two_seg_samples_per_und_sample_with_coloured_targets(tmp_path):
    config = small_config(tmp_path, recipe="sgt")
    model, text, images, cond = build_model(config)
    factory = SampleFactory(config, text, images, cond)
    assert factory.seg_colour
    data = TrainData(config, factory, text.pad_id)
    for _ in range(6):
        data.step()
    counts = data.streams[0].counts
    assert counts["und"] > 0 and 0 <= counts["seg"] - 2 * counts["und"] <= 2, counts
    scene_target = factory.target_image("seg", scenes.make_scene(3, 16))
    assert len({tuple(c) for c in scene_target.reshape(-1, 3)}) > 2  # colours, not edges


def test_round_robin_runs_single_task_packs_in_release_order(tmp_path):
    config = small_config(tmp_path, schedule="round-robin")
    model, text, images, cond = build_model(config)
    packs = TrainData(config, SampleFactory(config, text, images, cond), text.pad_id).step()
    assert [set(p.sample_tasks) for p in packs] == [{0}, {2}, {1}, {3}]  # und depth pixel seg


@needs_triton
@pytest.mark.parametrize("family", ["ar", "mar", "flow"])
def test_fast_and_plain_paths_agree(tmp_path, family):
    runs = {}
    for fast in (False, True):
        config = small_config(tmp_path / str(fast), family=family, fast_kernels=fast, steps=3,
                              eval_questions=0, eval_scenes=0)
        runs[fast] = train_rows(train(config))
    for plain, fast in zip(runs[False], runs[True]):
        # step 1 is the loss before any update; later steps track each other
        rtol = 1e-5 if plain["step"] == 1 else 1e-3
        for key in ["loss"] + [f"loss/{t}" for t in TASKS]:
            if plain[key] is None:
                assert fast[key] is None, key
                continue
            assert fast[key] == pytest.approx(plain[key], rel=rtol), \
                f"{family} step {plain['step']} {key}: fast {fast[key]} vs plain {plain[key]}"


@needs_triton
@pytest.mark.parametrize("fused_decoder", [True, False])
def test_no_fused_decoder_keeps_the_models_own_decoder_ops(tmp_path, monkeypatch, fused_decoder):
    """--fast-kernels runs the fused RMSNorm / SwiGLU / rotary in the decoder; with
    --no-fused-decoder those are the model's own while attention stays fused."""
    calls = count_kernel_calls(monkeypatch)
    config = small_config(tmp_path, fast_kernels=True, fused_decoder=fused_decoder, steps=1,
                          eval_questions=0, eval_scenes=0)
    train(config)
    assert calls["packed_attention"] > 0
    decoder = [calls[name] for name in DECODER_OPS]
    assert all(decoder) if fused_decoder else not any(decoder), calls


def _packs(config, steps=3):
    model, text, images, cond = build_model(config)
    data = TrainData(config, SampleFactory(config, text, images, cond), text.pad_id)
    return [pack for _ in range(steps) for pack in data.step()]


@pytest.mark.parametrize("family", ["ar", "mar", "flow"])
def test_packs_are_deterministic_by_seed(tmp_path, family):
    a = _packs(small_config(tmp_path, family=family, seed=3))
    b = _packs(small_config(tmp_path, family=family, seed=3))
    c = _packs(small_config(tmp_path, family=family, seed=4))
    for x, y in zip(a, b):
        assert x.layout == y.layout
        for name, value in vars(x).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, getattr(y, name)), name
    assert any(not torch.equal(x.input_ids, z.input_ids) or not torch.equal(x.vit_images, z.vit_images)
               for x, z in zip(a, c)), "another seed gave the same packs"


def test_pack_structure(tmp_path):
    config = small_config(tmp_path, family="mar")
    pack = _packs(config, steps=1)[0]
    layout = pack.layout
    assert layout.num_tokens == config.data.pack_tokens
    starts = layout.host("cu_seqlens")
    for s, (start, end) in enumerate(zip(starts[:-1], starts[1:])):  # positions restart
        assert torch.equal(pack.position_ids[start:end], torch.arange(end - start)), s
    # the LM head scores answer tokens only: each target is the token after its row
    assert torch.equal(pack.input_ids[pack.text_rows + 1], pack.text_targets)
    # target tokens sit in "full" spans for mar; ViT rows in the first span of each sample
    modes = layout.host("span_modes")[layout.host("token_span")]
    assert (modes[pack.gen_rows.numpy()] == 1).all()
    assert (modes[pack.vit_rows.numpy()] == 1).all()
    assert pack.scored.shape == pack.scored_task.shape and pack.scored.max() < pack.gen_rows.shape[0]


def test_held_out_scenes_are_disjoint_from_training_scenes():
    for seed in (0, 1, 99_999):
        assert eval_scene_seed(seed, 0) > train_scene_seed(100_000, 10 ** 9)


def test_held_out_samples_too_long_for_a_pack_are_refused_not_left_out(tmp_path):
    """The evaluation packed its samples with a StreamingPacker and never looked at what
    it rejected: a held-out sample longer than a pack vanished from the per-task losses,
    and a question that outgrew a pack while decoding stopped growing (scored wrong)."""
    from trainer import data as data_module
    from trainer.config import ConfigError
    from trainer.evaluate import held_out

    config = small_config(tmp_path)
    _, text, images, cond = build_model(config)
    factory = SampleFactory(config, text, images, cond)
    with pytest.raises(ConfigError, match=r"--pack-tokens.*held-out \w+ sample holds \d+ "
                                          r"tokens, more than 40"):
        data_module.eval_packs(factory, list(TASKS), 2, 40, text.pad_id)
    questions = data_module.eval_questions(factory, config.data.eval_questions)
    # the longest pack greedy decoding builds: a question and all but its answer's last token
    fits = max(q.length + len(text.encode(q.qa.answer)) - 1 for q in questions)
    config.data.pack_tokens, config.data.eval_scenes = fits, 0   # questions only
    held_out(config, factory, text.pad_id)   # exactly fits
    config.data.pack_tokens = fits - 1
    with pytest.raises(ConfigError, match="held-out question with its answer"):
        held_out(config, factory, text.pad_id)


def test_non_finite_loss_stops_naming_step_and_task(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = model_module.UMM.loss

    def poisoned(self, pack, impl):
        out = original(self, pack, impl)
        calls["n"] += 1
        if calls["n"] == 5:  # step 5: depth's loss turns NaN
            depth = TASKS.index("depth")
            nan = torch.zeros_like(out.task_loss_sum)
            nan[depth] = float("nan")
            out = JointLossOutput(out.total + nan[depth], out.task_loss_sum + nan,
                                  out.task_weight_sum, out.task_rows)
        return out

    monkeypatch.setattr(model_module.UMM, "loss", poisoned)
    config = small_config(tmp_path, steps=8, log_every=3, checkpoint_every=2,
                          eval_questions=0, eval_scenes=0, max_skipped_steps=0)
    with pytest.raises(NonFiniteLoss) as info:   # found at the step-6 log step
        train(config)
    assert info.value.step == 5 and info.value.task == "depth"
    assert "step 5" in str(info.value) and "depth" in str(info.value)
    run_dir = info.value.run_dir
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["event"] == "train"] == [2, 3, 4]
    # the weights as the run stopped (steps 1-4 and 6 applied, 5 skipped), not step 4's
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 6 and "checkpoint.pt" in str(info.value)
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values()
               if v.is_floating_point())
    step4 = torch.load(run_dir / "checkpoints" / "step-00000004" / "state.pt",
                       weights_only=False)["step"]
    assert step4 == 4


def _poison(monkeypatch, steps, what):
    """Makes the steps in `steps` (one pack per step) non-finite: what='grad': a finite
    loss whose gradient is NaN (0 * d sqrt(u)/du at u = 0, e.g. a bf16 overflow in the
    backward); what='loss': depth's loss sum NaN."""
    real = distributed._LossModule.forward
    calls = {"n": 0}

    def forward(self, pack, impl):
        out = real(self, pack, impl)
        calls["n"] += 1
        if calls["n"] in steps:
            if what == "grad":
                x = next(p for p in self.umm.parameters() if p.requires_grad).reshape(-1)[0]
                bad = 0.0 * torch.sqrt(x - x.detach())
            else:
                bad = torch.zeros_like(out.task_loss_sum)
                bad[TASKS.index("depth")] = float("nan")
            out = out._replace(task_loss_sum=out.task_loss_sum + bad)
        return out

    monkeypatch.setattr(distributed._LossModule, "forward", forward)


def _dcp_tensors(path, tmp_path):
    """Every tensor of a resumable checkpoint (model and AdamW state), by flat name."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(out, weights_only=False))
    return flat


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused-adamw"])
def test_a_step_with_non_finite_gradients_is_skipped(tmp_path, monkeypatch, fused):
    """Step 4's loss is finite but its gradient is NaN: the step is skipped (its weights
    and AdamW state are step 3's: the checkpoints of steps 3 and 4 are equal), counted in
    the metrics, and training goes on. fused: the device-side skip of fused AdamW (CUDA's
    optimizer; torch runs it on a CPU too) through optimizer.found_inf."""
    if fused:
        real = torch.optim.AdamW
        monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: real(*a, **{**k, "fused": True}))
    _poison(monkeypatch, {4}, "grad")
    run_dir = train(small_config(tmp_path, steps=5, checkpoint_every=1, keep_checkpoints=5,
                                 family="ar", eval_questions=0, eval_scenes=0))
    monkeypatch.undo()
    rows = {r["step"]: r for r in train_rows(run_dir)}
    assert rows[4]["skipped_steps"] == 1 and rows[4]["loss"] is None, rows[4]
    assert rows[4]["grad_norm"] is None
    assert [rows[s]["skipped_steps_total"] for s in range(1, 6)] == [0, 0, 0, 1, 1]
    assert math.isfinite(rows[5]["loss"]) and math.isfinite(rows[5]["grad_norm"])
    step = {s: _dcp_tensors(run_dir / "checkpoints" / f"step-{s:08d}", tmp_path) for s in (3, 4, 5)}
    assert step[3].keys() == step[4].keys()
    assert any(".state." in k for k in step[4]), list(step[4])   # AdamW's state is in it
    for name in step[3]:
        assert torch.equal(step[3][name], step[4][name]), name
    assert any(not torch.equal(step[4][k], step[5][k]) for k in step[4])   # step 5 trained
    assert all(torch.isfinite(v).all() for v in step[5].values() if v.is_floating_point())
    skipped = [ckpt.read_state(run_dir / "checkpoints" / f"step-{s:08d}")["skipped_steps"]
               for s in (4, 5)]
    assert skipped == [{"skipped_total": 1, "consecutive": 1},
                       {"skipped_total": 1, "consecutive": 0}]
    final = torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


@pytest.mark.parametrize("bad, limit, stops_at", [
    ({3, 4}, 2, None), ({3, 4, 5}, 2, 5), ({2, 4}, 1, None)],
    ids=["2-in-a-row-of-2", "3-in-a-row-of-2", "2-apart-of-1"])
def test_more_than_max_skipped_steps_in_a_row_stop_the_run(tmp_path, monkeypatch, bad, limit,
                                                           stops_at):
    _poison(monkeypatch, bad, "loss")
    config = small_config(tmp_path, steps=6, log_every=3, max_skipped_steps=limit,
                          eval_questions=0, eval_scenes=0)
    if stops_at is not None:
        with pytest.raises(NonFiniteLoss) as info:
            train(config)
        assert info.value.step == stops_at and info.value.task == "depth"
        assert info.value.consecutive == limit + 1
        assert f"step {stops_at}" in str(info.value) and "--max-skipped-steps" in str(info.value)
        return
    rows = train_rows(train(config))
    assert [r["step"] for r in rows] == [3, 6]
    assert [r["skipped_steps"] for r in rows] == [sum(s <= 3 for s in bad), sum(s > 3 for s in bad)]
    assert rows[-1]["skipped_steps_total"] == len(bad)
    for row in rows:   # the skipped steps' NaN is left out of the interval's averages
        assert math.isfinite(row["loss"]) and math.isfinite(row["loss/depth"]), row
        assert all(row[f"loss/{t}"] is None or math.isfinite(row[f"loss/{t}"]) for t in TASKS)


def test_a_stopped_run_without_checkpoints_keeps_its_weights(tmp_path, monkeypatch):
    """--checkpoint-every 0 (the default) writes no resumable checkpoint: a run stopped by
    non-finite losses still leaves its sound weights in checkpoint.pt."""
    _poison(monkeypatch, {3, 4}, "loss")
    config = small_config(tmp_path, steps=6, log_every=2, max_skipped_steps=1,
                          eval_questions=0, eval_scenes=0)
    with pytest.raises(NonFiniteLoss) as info:
        train(config)
    saved = torch.load(info.value.run_dir / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 4 and not (info.value.run_dir / "checkpoints").exists()
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_a_stop_whose_weights_cannot_be_written_still_says_why_it_stopped(tmp_path,
                                                                          monkeypatch):
    _poison(monkeypatch, {2}, "loss")
    monkeypatch.setattr(report, "save_checkpoint",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    config = small_config(tmp_path, steps=4, log_every=2, max_skipped_steps=0,
                          eval_questions=0, eval_scenes=0)
    with pytest.raises(NonFiniteLoss) as info:
        train(config)
    message = str(info.value)
    assert "non-finite loss" in message and "depth" in message and "step 2" in message
    assert "writing its weights failed too" in message and "No space left" in message
    assert "as they are" not in message


def test_a_failure_in_the_final_evaluation_keeps_the_trained_weights(tmp_path, monkeypatch):
    from trainer import loop

    real, calls = loop.evaluate, {"n": 0}

    def evaluate(*args, **kwargs):   # the evaluation after training runs out of memory
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    config = small_config(tmp_path, steps=3, eval_questions=2, eval_scenes=1)
    with pytest.raises(torch.OutOfMemoryError):
        train(config)
    run_dir = next(p for p in tmp_path.iterdir() if (p / "metrics.jsonl").exists())
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 3 and saved["model"]


def test_a_checkpoint_in_a_run_of_skipped_steps_changes_nothing(tmp_path, monkeypatch):
    """The first steps all skipped, a checkpoint written among them: AdamW must not get
    state from it (an unfused AdamW had none, and DCP's get_state_dict made it by a step
    on zero gradients, counting AdamW's steps from 1: every later update changed)."""
    runs = []
    for every in (0, 2):
        monkeypatch.undo()
        _poison(monkeypatch, {1, 2}, "loss")   # counts this run's packs from 1
        runs.append(train_rows(train(small_config(tmp_path / str(every), steps=4, family="ar",
                                                  checkpoint_every=every, eval_questions=0,
                                                  eval_scenes=0))))
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]
    assert runs[0][-1]["skipped_steps_total"] == 2


def test_warm_up_length_is_not_lengthened_by_float_rounding(tmp_path):
    from trainer.loop import build_optimizer

    config = small_config(tmp_path, steps=100)
    config.optim.warmup = 0.07   # 0.07 * 100 = 7.000000000000001
    optimizer, schedule = build_optimizer(torch.nn.Linear(2, 2), config, torch.device("cpu"))
    factors = [schedule.lr_lambdas[0](step) for step in range(9)]
    assert factors[:7] == pytest.approx([(i + 1) / 7 for i in range(7)])
    assert factors[7] == 1.0 and factors[8] < 1.0


@pytest.mark.parametrize("fused", [None, True], ids=["adamw", "fused-adamw"])
def test_optimizer_step_skips_without_touching_weights_or_adamw_state(fused):
    p = torch.nn.Parameter(torch.randn(3, 3))
    optimizer = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1, fused=fused)
    p.grad = torch.randn(3, 3)
    optimizer_step(optimizer, torch.tensor(True))
    weights, state = p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()}
    p.grad = torch.full((3, 3), float("nan"))
    optimizer_step(optimizer, torch.tensor(False))
    assert torch.equal(p, weights)
    assert all(torch.equal(optimizer.state[p][k], v) for k, v in state.items())   # step too
    p.grad = torch.randn(3, 3)
    optimizer_step(optimizer, torch.tensor(True))
    assert not torch.equal(p, weights) and int(optimizer.state[p]["step"]) == 2


def test_summary_table_tolerates_evaluations_of_different_shapes(tmp_path):
    """The evaluation before (e.g. from a checkpoint) may hold what the one after lacks."""
    before = {"und_accuracy": 0.5, "und_questions": 2, "und_accuracy_by_kind": {"left": 0.5},
              "loss/depth": 1.0}
    s = report.summary(small_config(tmp_path), [], before, {"loss/depth": 0.5}, 1.0, "reference")
    table = report.summary_table(s)
    assert "50.0% before -> - after" in table and "left 50% -> -" in table, table


def test_run_directory_holds_every_output(tmp_path, capsys):
    run_dir = train(small_config(tmp_path, family="ar", steps=4))
    names = {p.name for p in run_dir.iterdir()}
    assert {"metrics.jsonl", "loss_curves.png", "checkpoint.pt", "summary.txt",
            "summary.json", "config.yaml"} <= names
    assert (run_dir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["family"] == "ar"
    for when in ("eval_before", "eval_after"):
        assert 0.0 <= summary[when]["und_accuracy"] <= 1.0
        assert summary[when]["und_questions"] == 4
        assert all(math.isfinite(summary[when][f"loss/{t}"]) for t in TASKS)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 4 and checkpoint["config"]["model"]["family"] == "ar"
    assert not any(k.startswith("vit.") for k in checkpoint["model"])
    assert "codes" in checkpoint["image_tokenizer"]
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert "held-out" in capsys.readouterr().out


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    """The name is a second-resolution stamp: a run whose exists() check came just before
    another run's mkdir crashed with FileExistsError. mkdir itself is the test now."""
    import pathlib

    config = small_config(tmp_path)
    config.run.name = "same-second"   # what two stamps of one second give
    first = report.make_run_dir(config)
    monkeypatch.setattr(pathlib.Path, "exists", lambda self: False)   # the race's view
    second = report.make_run_dir(config)
    third = report.make_run_dir(config)
    assert len({first, second, third}) == 3 and all(p.is_dir() for p in (first, second, third))
    assert second.name == first.name + "-2" and third.name == first.name + "-3"


def test_checkpoint_reloads_into_a_fresh_model(tmp_path):
    config = small_config(tmp_path, family="flow", steps=2)
    run_dir = train(config)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert Config.from_dict(checkpoint["config"]) == config
    model, *_ = build_model(config)
    missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
    assert not unexpected and all(k.startswith("vit.") for k in missing)


def test_encoder_is_frozen_and_everything_else_trains(tmp_path):
    config = small_config(tmp_path)
    model, *_ = build_model(config)
    model.train()
    assert not model.vit.training
    assert not any(p.requires_grad for p in model.vit.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("vit."))


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    model, *_ = build_model(small_config(tmp_path, gradient_checkpointing=True))
    assert all(layer.gradient_checkpointing for layer in model.llm.layers)
    runs = [train_rows(train(small_config(tmp_path / str(gc), steps=3, gradient_checkpointing=gc,
                                          eval_questions=0, eval_scenes=0)))
            for gc in (False, True)]
    for a, b in zip(*runs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_a_local_qwen2_checkpoint_and_siglip_are_post_trained(tmp_path):
    """--llm PATH and --vit PATH: a tiny Qwen2 + tokenizer and a SigLIP vision tower
    saved locally (nothing downloaded), loaded with local_files_only."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
                              SiglipVisionConfig, SiglipVisionModel)

    from trainer.tokenizers import WordTokenizer

    words = WordTokenizer().id_to_word
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words[4:])}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", unk_token="<unk>")
    llm_dir, vit_dir = tmp_path / "llm", tmp_path / "vit"
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=16))
    qwen.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=8)
                      ).save_pretrained(vit_dir)
    config = small_config(tmp_path, llm=str(llm_dir), vit=str(vit_dir), steps=8)
    model, text, _, cond = build_model(config)
    assert cond == 16 and text.vocab_size == len(vocab)     # 32 px / 8 px patches
    assert torch.equal(model.lm_head.weight, qwen.lm_head.weight)
    rows = train_rows(train(config))
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert np.mean(task_losses(rows, "depth")[-3:]) < np.mean(task_losses(rows, "depth")[:3])


@pytest.mark.parametrize("setting, said", [
    ({"attention_dropout": 0.1}, "attention_dropout 0.1"),
    ({"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0},
     "64-token sliding window")])
def test_an_llm_whose_attention_a_pack_cannot_give_is_refused(tmp_path, setting, said):
    """Dropout on the attention weights and sliding-window layers: the packed attention
    has neither, so such a checkpoint would train without them, silently."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trainer.config import ConfigError
    from trainer.model import _load_llm

    path = tmp_path / "llm"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=16, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=16, **setting)
                     ).save_pretrained(path)
    with pytest.raises(ConfigError, match=f"--llm.*{said}"):
        _load_llm(str(path), tie=False)
    with pytest.raises(ConfigError, match=f"--llm.*{said}"):
        _load_llm(str(path), tie=False, pack_tokens=65)   # one token past the window
    if "sliding_window" in setting:   # a window as long as a pack never binds: loads
        llm, _ = _load_llm(str(path), tie=False, pack_tokens=64)
        assert llm.config.layer_types == ["sliding_attention"]
        # transformers' own rule, which the acceptance rests on: a 64-token window over a
        # 64-token sample is full causal attention; a 63-token one is not
        from transformers import Qwen2Model

        def hidden(**config):
            torch.manual_seed(0)
            model = Qwen2Model(Qwen2Config(vocab_size=16, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=16, **config))
            model.config._attn_implementation = "eager"
            return model(inputs_embeds=torch.randn(1, 64, 32, generator=torch.Generator()
                                                   .manual_seed(1))).last_hidden_state

        full = hidden()
        assert torch.allclose(hidden(**setting), full, atol=1e-6)
        shorter = hidden(**{**setting, "sliding_window": 63})   # the last query loses a key
        assert torch.allclose(shorter[:, :63], full[:, :63], atol=1e-6)
        assert (shorter[:, 63] - full[:, 63]).abs().max() > 1e-4
    # and the attention function itself, for any other caller
    q = torch.randn(1, 2, 8, 16)
    layout = model_module.uf.PackedLayout.from_spans([[(8, "causal")]])
    with pytest.raises(ValueError, match="dropout 0.1"):
        model_module.packed_attention_forward(None, q, q, q, None, dropout=0.1,
                                              packed_layout=layout)
    with pytest.raises(ValueError, match="sliding window of 4 tokens"):
        model_module.packed_attention_forward(None, q, q, q, None, sliding_window=4,
                                              packed_layout=layout)
    out, _ = model_module.packed_attention_forward(None, q, q, q, None, sliding_window=8,
                                                   packed_layout=layout)   # no effect: fine
    assert out.shape == (1, 8, 2, 16)


def test_a_sample_sees_nothing_of_its_pack_neighbours(tmp_path):
    """Packed attention + restarting positions: each sample's hidden states in a pack are
    those it has alone, so packing changes nothing but speed."""
    from trainer.data import build_pack

    config = small_config(tmp_path, family="flow")
    model, text, images, cond = build_model(config)
    model.eval()
    factory = SampleFactory(config, text, images, cond)
    samples = [factory.train_sample(task, i) for i, task in enumerate(TASKS)]
    with torch.no_grad():
        pack = build_pack(samples, 256, text.pad_id, cond, config.model.latent_channels)
        gen, _ = model.gen.inputs(pack)
        packed = model.hidden_states(pack, "reference", gen)
        start = 0
        for sample in samples:
            alone = build_pack([sample], sample.length, text.pad_id, cond, config.model.latent_channels)
            gen, _ = model.gen.inputs(alone) if alone.gen_rows.numel() else (None, None)
            single = model.hidden_states(alone, "reference", gen)
            torch.testing.assert_close(packed[start:start + sample.length], single,
                                       rtol=1e-4, atol=1e-5)
            start += sample.length


def test_transformers_builds_no_attention_mask_for_packs(tmp_path):
    from transformers.masking_utils import create_causal_mask

    model, *_ = build_model(small_config(tmp_path))
    assert model.llm.config._attn_implementation == model_module.ATTENTION_NAME
    x = torch.zeros(1, 64, model.llm.config.hidden_size)
    mask = create_causal_mask(config=model.llm.config, inputs_embeds=x, attention_mask=None,
                              past_key_values=None, position_ids=torch.arange(64)[None])
    assert mask is None


def test_greedy_answers_stay_inside_the_tokenizer_when_the_model_is_wider(tmp_path):
    # --vocab-size (or Qwen's 151,936 rows over the synthetic words) makes the LM head
    # wider than the tokenizer; an argmax past it crashed decode() in the evaluation
    run_dir = train(small_config(tmp_path, steps=1, vocab_size=4000, eval_questions=4,
                                 eval_scenes=1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "und_accuracy" in json.dumps(summary)


def test_tokens_per_s_leaves_the_checkpoint_time_out(tmp_path, monkeypatch):
    import time

    real = ckpt.save

    def slow_save(*args, **kwargs):   # a large model's save takes seconds
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save", slow_save)
    rows = train_rows(train(small_config(tmp_path, steps=4, log_every=1, checkpoint_every=2)))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["interval_s"] < 1.0, [r["interval_s"] for r in rows]


def test_held_out_questions_are_drawn_independently_of_their_scenes(tmp_path):
    """Seeding a question with its scene's own seed replayed make_scene's random stream:
    the question kind followed the object count ("closer" almost only on 2-object scenes,
    "colour" on 4-object ones). Every kind must meet scenes of several sizes."""
    from trainer import data as data_module

    config = small_config(tmp_path)
    _, text, images, cond = build_model(config)
    factory = SampleFactory(config, text, images, cond)
    questions = data_module.eval_questions(factory, 200)
    sizes = {}
    for i, q in enumerate(questions):
        scene = scenes.make_scene(data_module.eval_scene_seed(config.data.seed, i),
                                  factory.image_size)
        sizes.setdefault(q.qa.kind, set()).add(len(scene.objects))
    assert len(sizes) == 4 and all(len(s) >= 2 for s in sizes.values()), sizes
