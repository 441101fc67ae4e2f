"""`python -m trainer --estimate` (trainer/estimate.py): real-data text lengths, the
buffer-token factor from executed FLOPs, the projection's arithmetic (the recipe's global
batch kept for any --gpus, the all-reduce bound) and its argument checks."""
import subprocess
import sys

import numpy as np
import pytest

from trainer import estimate, telemetry
from trainer.data import UND, SampleFactory
from trainer.model import build_model
from trainer_helpers import small_config

NO_FLOPS = dict(decoder=0.0, attn_pair=0.0, lm_head=0.0, projector=0.0, vit_token=0.0,
                gen_input=0.0, gen_scored=0.0)


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    config = small_config(tmp_path_factory.mktemp("estimate"), family="mar", pack_tokens=2048)
    model, text, images, cond = build_model(config)
    return config, SampleFactory(config, text, images, cond), text


@pytest.mark.parametrize("seed", range(3))
def test_understanding_answers_grow_to_real_lengths_and_stay_scored(factory, seed):
    _, samples, text = factory
    sample = samples.train_sample("und", seed)
    grown = estimate.with_text_length(sample, np.random.default_rng(seed), text.vocab_size)
    low, high = estimate.ANSWER_TOKENS
    assert low <= len(grown.label_ids) <= high and len(grown.label_ids) > len(sample.label_ids)
    assert grown.length == sum(n for n, _ in grown.spans)
    # position p predicts token p + 1, for the old answer tokens and the new ones
    np.testing.assert_array_equal(grown.input_ids[grown.label_rows + 1], grown.label_ids)
    assert grown.spans[0] == sample.spans[0]                      # the image is unchanged


@pytest.mark.parametrize("task", ["depth", "pixel", "seg"])
def test_generation_prompts_grow_and_the_target_moves_with_them(factory, task):
    _, samples, text = factory
    sample = samples.train_sample(task, 1)
    grown = estimate.with_text_length(sample, np.random.default_rng(0), text.vocab_size)
    low, high = estimate.PROMPT_TOKENS
    assert low <= grown.spans[1][0] <= high and grown.spans[2] == sample.spans[2]
    extra = grown.length - sample.length
    assert extra > 0 and grown.target_start == sample.target_start + extra
    np.testing.assert_array_equal(grown.input_ids[grown.target_start:],
                                  sample.input_ids[sample.target_start:])
    assert grown.task != UND and len(grown.label_ids) == 0


def _handmade_pack(spans, tasks, pack_tokens=None):
    """A Pack of the given samples' spans, with no head rows (only the layout counts)."""
    from trainer.data import Pack
    from unimrg_fast.layout import PackedLayout

    pack = Pack.__new__(Pack)
    pack.layout = PackedLayout.from_spans(spans, pad_to=pack_tokens)
    pack.sample_tasks, pack.num_real_tokens = tuple(tasks), sum(n for s in spans for n, _ in s)
    for name in ("text_rows", "vit_rows", "gen_rows", "scored"):
        setattr(pack, name, np.zeros(0))
    return pack


def test_buffer_factor_is_the_executed_work_of_the_grown_packs(factory):
    config, samples, text = factory
    packs = estimate._packs(config, samples, text.pad_id, 4)
    pack_tokens = config.data.pack_tokens
    assert estimate.buffer_token_factor(telemetry.FlopModel(**NO_FLOPS), packs, 0,
                                        pack_tokens) == 1.0
    linear = telemetry.FlopModel(**{**NO_FLOPS, "decoder": 1.0})
    # the decoder runs over every slot: buffer tokens that still fit in the packs cost
    # nothing more (the old model-FLOP factor grew with them: real + buffer x images)
    assert estimate.buffer_token_factor(linear, packs, 5, pack_tokens) == 1.0
    # ... and ones that no longer fit cost a pack: two samples of [40 full | 10 causal]
    # fill one 128-token pack; with 30 buffer tokens each is 80 tokens, one per pack
    two = [_handmade_pack([[(40, "full"), (10, "causal")]] * 2, (0, 0), 128)]
    assert estimate.buffer_token_factor(linear, two, 30, 128) == 2.0
    # attention alone, by hand, one generation sample [4 full | 3 causal | 5 noise] in a
    # 20-token pack: pairs of a sample of a full, 3 causal and n noise tokens, and of the
    # padding (a causal sample of its own)
    pairs = lambda a, n: a * a + 3 * a + 6 + n * (a + 3) + n * n   # noqa: E731
    padding = lambda p: p * (p + 1) // 2                           # noqa: E731
    attention = telemetry.FlopModel(**{**NO_FLOPS, "attn_pair": 1.0})
    one = [_handmade_pack([[(4, "full"), (3, "causal"), (5, "noise")]], (2,), 20)]
    assert estimate.buffer_token_factor(attention, one, 2, 20) == pytest.approx(
        (pairs(6, 7) + padding(4)) / (pairs(4, 5) + padding(8)))
    # a grown sample longer than a pack names --pack-tokens
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="--pack-tokens.*26 tokens"):
        estimate.buffer_token_factor(attention, one, 7, 20)


def test_buffer_tokens_apply_where_the_preset_images_are_harmons_less_the_buffer(monkeypatch):
    """Harmon's 1,088-token images: +64 on a preset whose images have 1,024 tokens (any
    of them, not only the recipe's own), nothing on tiny's small ones."""
    seen = {}
    real = estimate.buffer_token_factor

    def spy(flops, packs, buffer, pack_tokens):
        seen["buffer"] = buffer
        return real(flops, packs, buffer, pack_tokens)

    monkeypatch.setattr(estimate, "buffer_token_factor", spy)
    recipe = estimate.ESTIMATE_RECIPES["unimrg-harmon-1.5b"]
    out = estimate.estimate("tiny", recipe, 2, None, [], warmup=0, timed=1, checkpointing=False)
    assert seen["buffer"] == out["buffer_tokens"] == 0 and out["buffer_factor"] == 1.0
    grown = dict(recipe, image_tokens=out["image_tokens"] + 3, buffer_tokens=3)
    out = estimate.estimate("tiny", grown, 2, None, [], warmup=0, timed=1, checkpointing=False)
    assert seen["buffer"] == out["buffer_tokens"] == 3 and out["buffer_factor"] > 1.0


RESULT = {"device": "NVIDIA H200", "tokens": 30_000, "packs": 2, "pack_tokens": 16_384,
          "image_tokens": 1_024, "answer_rows": 1_100, "params": 1.9e9, "trainable": 1.5e9,
          "buffer_tokens": 64, "buffer_factor": 1.1,
          "paths": {"fast": {"step_s": 0.5, "peak_gib": 60.0}, "plain": {"step_s": 1.0}}}


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_projection_keeps_the_recipe_global_batch_and_bounds_the_all_reduce(gpus):
    recipe = estimate.ESTIMATE_RECIPES["unimrg-harmon-1.5b"]
    text = estimate.report("unimrg-harmon-1.5b", recipe, "qwen2.5-1.5b", 16, 10_000, gpus, RESULT)
    micro = 8 // gpus
    reduce_s = 2 * (gpus - 1) / gpus * 4 * 1.5e9 / 400e9   # ring all-reduce of fp32 grads
    fast = 10_000 * (micro * 0.5 * 1.1 + reduce_s) / 3600
    plain = 10_000 * (micro * 1.0 * 1.1 + reduce_s) / 3600
    assert f"projected {fast:.2f} h" in text and f"projected {plain:.2f} h" in text, text
    assert f"each does {micro} micro-batch" in text and "not modelled" in text
    if gpus == 8:
        assert "26 ms all-reduce of 6.0 GB" in text   # 2 * 7/8 * 6.0 GB at 400 GB/s
        assert ("MET" if fast < 3 else "NOT MET") in text
        assert "for the whole recipe" in text
    else:
        assert "applies at qwen2.5-1.5b, 16 samples per GPU and 10,000 iterations on 8 " \
               "GPUs only" in text and "MET" not in text


@pytest.mark.parametrize("samples, iterations", [(16, 100), (2, 10_000)])
def test_no_verdict_on_the_target_for_another_batch_or_length(samples, iterations):
    """The < 3 h target is the recipe's: 100 iterations, or 2 samples per GPU, are not."""
    recipe = estimate.ESTIMATE_RECIPES["unimrg-harmon-1.5b"]
    text = estimate.report("unimrg-harmon-1.5b", recipe, "qwen2.5-1.5b", samples, iterations,
                           8, RESULT)
    assert "MET" not in text and "whole recipe" not in text, text
    assert f"for {iterations:,} iterations" in text and "target applies at" in text
    assert ("the recipe's global micro-batch" in text) == (samples == 16)


def test_the_fast_path_with_the_models_own_decoder_ops_is_reported_beside_it():
    result = {**RESULT, "paths": {**RESULT["paths"], "fast-hf-decoder": {"step_s": 0.6}}}
    recipe = estimate.ESTIMATE_RECIPES["unimrg-harmon-1.5b"]
    text = estimate.report("unimrg-harmon-1.5b", recipe, "qwen2.5-1.5b", 16, 10_000, 8, result)
    reduce_s = 2 * 7 / 8 * 4 * 1.5e9 / 400e9
    line = next(l for l in text.splitlines() if "fast, HF decoder ops" in l)
    assert f"projected {10_000 * (0.6 * 1.1 + reduce_s) / 3600:.2f} h" in line   # 1 micro-batch
    on_cpu = estimate.report("unimrg-harmon-1.5b", recipe, "qwen2.5-1.5b", 16, 10_000, 8,
                             {**result, "device": "cpu"})
    assert sum("on the Triton interpreter" in l for l in on_cpu.splitlines()) == 2   # fast ones


@pytest.mark.parametrize("path, decoder_fused", [("fast", True), ("fast-hf-decoder", False)])
def test_the_fast_paths_differ_only_in_the_decoder_ops(monkeypatch, path, decoder_fused):
    """Timed on the tiny preset: both fast paths run fused attention; only "fast" runs the
    fused RMSNorm / SwiGLU / rotary in the decoder."""
    from trainer_helpers import DECODER_OPS, count_kernel_calls

    calls = count_kernel_calls(monkeypatch)
    recipe = estimate.ESTIMATE_RECIPES["unimrg-harmon-1.5b"]
    out = estimate.estimate("tiny", recipe, 2, None, [path], warmup=0, timed=1,
                            checkpointing=False)
    assert "step_s" in out["paths"][path], out["paths"]
    assert calls["packed_attention"] > 0
    decoder = [calls[name] for name in DECODER_OPS]
    assert all(decoder) if decoder_fused else not any(decoder), calls


@pytest.mark.parametrize("args, flag", [
    (["--gpus", "3"], "--gpus"), (["--gpus", "0"], "--gpus"),
    (["--samples-per-gpu", "0"], "--samples-per-gpu"), (["--iterations", "0"], "--iterations"),
    (["--warmup-steps", "-1"], "--warmup-steps"), (["--pack-tokens", "0"], "--pack-tokens"),
    (["--paths", "fast,fastest"], "--paths")])
def test_bad_estimate_arguments_exit_2_naming_the_flag(args, flag, capsys):
    with pytest.raises(SystemExit) as info:
        estimate.main(["--estimate", "--preset", "tiny", *args])
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


def test_pack_tokens_below_a_sample_exits_2_naming_it():
    result = subprocess.run([sys.executable, "-m", "trainer", "--estimate", "--preset", "tiny",
                             "--pack-tokens", "100", "--paths", "plain"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "--pack-tokens" in result.stderr and "Traceback" not in result.stderr


def test_an_estimate_the_host_memory_cannot_hold_is_refused_before_it_starts(factory):
    # The real recipe on a 24 GB CPU machine was killed by the OOM killer, printing nothing.
    import torch

    config = factory[0]
    model = build_model(config)[0]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert 0 < trained <= weights
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    # a CPU run holds a host copy of the weights, the gradients and two AdamW moments
    estimate.check_host_memory(model, cpu, "tiny", available=weights + 3 * trained)
    with pytest.raises(ValueError, match=r"--preset: .*preset tiny needs at least .*GiB of "
                                         r"host memory.*--preset tiny"):
        estimate.check_host_memory(model, cpu, "tiny", available=weights + 3 * trained - 1)
    # a GPU run holds only the host copy on the host
    estimate.check_host_memory(model, gpu, "tiny", available=weights)
    with pytest.raises(ValueError, match="the weights' host copy \\(beyond"):
        estimate.check_host_memory(model, gpu, "tiny", available=weights - 1)


def test_the_memory_check_exits_2_before_timing(monkeypatch, capsys):
    monkeypatch.setattr(estimate, "host_memory_available", lambda: 1024)
    timed = []
    monkeypatch.setattr(estimate, "_sync", lambda device: timed.append(device))
    with pytest.raises(SystemExit) as info:
        estimate.main(["--estimate", "--preset", "tiny", "--paths", "plain"])
    assert info.value.code == 2 and not timed
    assert "GiB of host memory" in capsys.readouterr().err


def test_the_host_copy_of_a_tied_head_is_made_once():
    import torch

    shared, other = torch.randn(5, 3), torch.randn(5, 3)
    state = {"embed.weight": shared, "lm_head.weight": shared, "norm.weight": other,
             "row": shared[1]}   # a view of the shared matrix is not the matrix
    copy = estimate.host_copy(state)
    assert copy["embed.weight"] is copy["lm_head.weight"]
    assert copy["embed.weight"] is not shared and copy["row"] is not copy["embed.weight"]
    for key, value in state.items():
        assert torch.equal(copy[key], value) and copy[key].data_ptr() != value.data_ptr(), key
