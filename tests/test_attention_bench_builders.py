"""CPU smoke test of the input builders of benchmarks/test_bench_attention.py.

The GPU benchmarks skip on a CPU-only machine; what they feed the kernels (UMM packs,
exact allowed-pair counts, FLOP conventions, the timed callables) is checked here on
tiny packs of the same structure.
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from numerics import assert_rel
from test_reference_attention import attention64, random_layout, rule_mask
from unimrg_fast.layout import PackedLayout

_spec = importlib.util.spec_from_file_location(
    "bench_attention", Path(__file__).resolve().parents[1] / "benchmarks" / "test_bench_attention.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

MODE_NAMES = ("causal", "full", "noise")


@pytest.mark.parametrize("variant", bench.PACK_VARIANTS)
@pytest.mark.parametrize("num_tokens", [16384, 65536])
def test_packs_look_like_design_section_5(variant, num_tokens):
    samples = bench.draw_umm_pack(num_tokens, seed=3, variant=variant)
    image = 1088 if variant == "unimrg" else 256
    used = sum(n for sample in samples for n, _ in sample)
    assert num_tokens - used < image + 512 + 1024 + 48            # the next sample did not fit
    kinds = set()
    for sample in samples:
        (n_img, m_img), (n_txt, m_txt), *rest = sample
        assert (n_img, m_img) == (image, "full") and m_txt == "causal"
        if rest:
            assert rest == [(1024, "noise")] and 8 <= n_txt <= 48
            kinds.add("generation")
        else:
            assert 32 <= n_txt <= 512
            kinds.add("understanding")
    if num_tokens == 65536:
        assert kinds == {"generation", "understanding"}
    layout = bench.umm_layout(num_tokens, seed=3, variant=variant)
    assert layout.num_tokens == num_tokens and layout.num_samples == len(samples) + 1
    assert layout.spans[-1] == ((num_tokens - used, 0),)             # causal padding sample


def test_task_shares_follow_the_variant():
    unimrg = bench.draw_umm_pack(1 << 20, seed=0, variant="unimrg")
    sgt = bench.draw_umm_pack(1 << 20, seed=0, variant="sgt")
    generation = lambda samples: np.mean([len(s) == 3 for s in samples])
    assert abs(generation(unimrg) - 0.75) < 0.05                     # 3 of the 4 UniMRG tasks
    assert abs(generation(sgt) - 2 / 3) < 0.05                       # SGT: segmentation 2 : 1 VQA
    with pytest.raises(ValueError, match="unknown pack variant"):
        bench.draw_umm_pack(4096, 0, "bagel")


@pytest.mark.parametrize("variant", bench.PACK_VARIANTS)
@pytest.mark.parametrize("seed", range(3))
def test_allowed_pairs_counts_the_dense_mask_on_shrunk_packs(variant, seed):
    layout = bench.umm_layout(1000, seed=seed, variant=variant, shrink=32)
    assert layout.num_samples > 3
    assert layout.attended_pairs() == int(layout.dense_mask().sum())
    # flash's speed of light: one causal span per sample, counted on its own dense mask
    causal = PackedLayout.from_spans([[(int(n), "causal")] for n in layout.seqlens])
    assert bench.causal_pairs(layout) == int(causal.dense_mask().sum())
    first = layout.num_samples - 1   # all but the last (the padding sample, if any)
    assert bench.causal_pairs(layout, first) == causal.attended_pairs(first)


@pytest.mark.parametrize("seed", range(8))
def test_allowed_pairs_on_random_layouts_with_every_mode(seed):
    layout, samples = random_layout(seed)
    assert layout.attended_pairs() == int(rule_mask(samples).sum()), samples


def test_attended_pairs_of_a_generation_sample_by_hand():
    layout = PackedLayout.from_spans([[(4, "full"), (3, "causal"), (5, "noise")], [(2, "causal")]])
    image, text, noise, pad = 4 * 4, 3 * 4 + 6, 5 * 7 + 25, 3
    assert layout.attended_pairs() == image + text + noise + pad
    assert layout.attended_pairs(1) == image + text + noise   # without the padding sample


def test_flop_convention():
    assert bench.attention_flops(10, 12, 128, "fwd") == 4 * 128 * 12 * 10
    assert bench.attention_flops(10, 12, 128, "fwd+bwd") == 3 * bench.attention_flops(10, 12, 128, "fwd")
    with pytest.raises(KeyError):
        bench.attention_flops(10, 12, 128, "bwd")


@pytest.mark.parametrize("passes", bench.PASSES)
def test_reference_variant_runs_once_at_a_tiny_size(passes):
    layout = bench.umm_layout(600, seed=1, variant="unimrg", shrink=64)
    samples = [[(n, MODE_NAMES[m]) for n, m in sample] for sample in layout.spans]
    q, k, v, grad_out = bench.make_inputs(layout, 4, 2, 16, torch.float32, passes == "fwd+bwd", seed=5)
    assert q.shape == (600, 4, 16) and k.shape == v.shape == (600, 2, 16)
    step = bench.attention_step(bench.attention_forward("reference", layout), q, k, v, grad_out, passes)
    result = step()
    if passes == "fwd":
        want, _ = attention64(q, k, v, rule_mask(samples), 0.25)
        assert_rel(result, want, 1e-5, "reference variant out")
    else:
        dq, dk, dv = result
        assert dq.shape == q.shape and dk.shape == k.shape and q.grad is None
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in result)


def test_flex_variants_match_the_reference_forward_on_cpu():
    layout = bench.umm_layout(300, seed=2, variant="sgt", shrink=32)
    q, k, v, grad_out = bench.make_inputs(layout, 4, 2, 16, torch.float32, False, seed=6)
    want = bench.attention_step(bench.attention_forward("reference", layout), q, k, v, grad_out, "fwd")()
    for variant in ("flex", "flex+mask-build"):
        try:
            got = bench.attention_step(bench.attention_forward(variant, layout), q, k, v, grad_out, "fwd")()
        except NotImplementedError as exc:  # a torch without CPU flex
            pytest.skip(f"{variant} does not run on CPU here: {exc}")
        assert_rel(got, want, 1e-5, f"{variant} variant")


def test_unknown_variants_and_missing_peers():
    layout = bench.umm_layout(64, seed=0, shrink=64)
    with pytest.raises(ValueError, match="unknown attention variant"):
        bench.attention_forward("cudnn", layout)
    with pytest.raises(ValueError, match="passes must be one of"):
        bench.attention_step(lambda *x: None, None, None, None, None, "bwd")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError):
            bench.attention_forward("flash-causal-sol", layout)
