"""The reference packed attention against an independent float64 attention.

The oracle here shares nothing with the code under test: its mask is built by Python
loops straight from the span list and the rule of DESIGN.md 3.4 (not by
PackedLayout.dense_mask / sample_mask), and attention is an explicit
softmax(Q K^T * scale + mask) V over the whole pack in float64.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unimrg_fast.layout import PackedLayout
from unimrg_fast.reference.attention import packed_attention
from numerics import assert_rel as assert_close

MODES = ("causal", "full", "noise")


# --------------------------------------------------------------------------- oracle
def rule_mask(samples) -> torch.Tensor:
    """[T, T] bool from the span list, by the rule, one pair at a time."""
    tokens = []  # (sample, global span id, mode) per token
    span_id = 0
    for s, sample in enumerate(samples):
        for length, mode in sample:
            tokens.extend([(s, span_id, mode)] * length)
            span_id += 1
    n = len(tokens)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for qi, (sq, pq, mq) in enumerate(tokens):
        for ki, (sk, pk, mk) in enumerate(tokens):
            same_sample = sq == sk
            ordered = ki <= qi or (pq == pk and mq in ("full", "noise"))
            key_visible = mk != "noise" or pq == pk
            mask[qi, ki] = same_sample and ordered and key_visible
    return mask


def attention64(q, k, v, mask, scale):
    """Float64 softmax(QK^T * scale + mask) V over the whole pack; returns (out, lse [Hq, T])."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    kv_head = torch.arange(q.shape[1]) // group                      # q head h reads h // group
    k, v = k[:, kv_head], v[:, kv_head]                               # [T, Hq, D]
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v), torch.logsumexp(scores, dim=-1)


# --------------------------------------------------------------------------- layouts
def random_samples(rng, num_samples, max_len=9):
    """Random samples of 1-6 spans, every mode, many length-1 spans."""
    samples = []
    for _ in range(num_samples):
        spans = []
        for _ in range(int(rng.integers(1, 7))):
            length = 1 if rng.random() < 0.3 else int(rng.integers(1, max_len + 1))
            spans.append((length, MODES[int(rng.integers(0, 3))]))
        samples.append(spans)
    return samples


def random_layout(seed, num_samples=None, pad=None):
    """(layout, samples as given to the oracle, padding included)."""
    rng = np.random.default_rng(seed)
    samples = random_samples(rng, num_samples or int(rng.integers(1, 6)))
    total = sum(n for sample in samples for n, _ in sample)
    if pad is None:
        pad = bool(rng.integers(0, 2))
    if pad:
        extra = int(rng.integers(1, 6))
        layout = PackedLayout.from_spans(samples, pad_to=total + extra)
        samples = samples + [[(extra, "causal")]]
    else:
        layout = PackedLayout.from_spans(samples)
    return layout, samples


# Hand-picked packs on top of the random ones: the corner cases, each named.
FIXED = {
    "one_token": [[(1, "causal")]],
    "all_length_one_samples": [[(1, m)] for m in ("noise", "full", "causal", "noise", "full")],
    "all_length_one_spans": [[(1, "full"), (1, "noise"), (1, "causal"), (1, "noise")],
                             [(1, "causal"), (1, "full")]],
    "umm_generation": [[(7, "full"), (3, "causal"), (6, "noise")], [(5, "full"), (4, "causal")]],
    "noise_first_then_causal": [[(4, "noise"), (3, "causal"), (2, "full")]],
    "single_noise_sample": [[(11, "noise")]],
}


def make_qkv(t, hq, hkv, d, dtype, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    k = torch.randn(t, hkv, d, generator=g).to(dtype)
    v = torch.randn(t, hkv, d, generator=g).to(dtype)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


HEADS = [pytest.param(4, 4, id="mha"), pytest.param(4, 2, id="gqa"), pytest.param(3, 1, id="mqa")]


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("d", [16, 24])
@pytest.mark.parametrize("seed", range(4))
def test_forward_fp32_random_layouts(hq, hkv, d, seed):
    layout, samples = random_layout(seed * 7 + d + hq)
    q, k, v = make_qkv(layout.num_tokens, hq, hkv, d, torch.float32, seed)
    out, lse = packed_attention(q, k, v, layout, return_lse=True)
    ref, ref_lse = attention64(q, k, v, rule_mask(samples), d ** -0.5)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close(out, ref, 1e-5, f"out (T={layout.num_tokens}, spans={samples})")
    assert_close(lse, ref_lse, 1e-5, f"lse (T={layout.num_tokens}, spans={samples})")


@pytest.mark.parametrize("name", sorted(FIXED))
def test_forward_fp32_corner_layouts(name):
    samples = FIXED[name]
    layout = PackedLayout.from_spans(samples)
    q, k, v = make_qkv(layout.num_tokens, 4, 2, 16, torch.float32, 3)
    out, lse = packed_attention(q, k, v, layout, return_lse=True)
    ref, ref_lse = attention64(q, k, v, rule_mask(samples), 0.25)
    assert_close(out, ref, 1e-5, f"out [{name}]")
    assert_close(lse, ref_lse, 1e-5, f"lse [{name}]")


def test_forward_with_padding_and_odd_size():
    samples = [[(5, "full"), (2, "causal")], [(3, "causal"), (6, "noise"), (1, "full")]]
    layout = PackedLayout.from_spans(samples, pad_to=37)           # 17 tokens + 20 padding
    assert layout.num_tokens == 37 and layout.num_samples == 3
    q, k, v = make_qkv(37, 2, 1, 24, torch.float32, 11)
    out, lse = packed_attention(q, k, v, layout, return_lse=True)
    ref, ref_lse = attention64(q, k, v, rule_mask(samples + [[(20, "causal")]]), 24 ** -0.5)
    assert_close(out, ref, 1e-5, "out")
    assert_close(lse, ref_lse, 1e-5, "lse")


def test_custom_scale_and_default_scale_differ():
    layout, samples = random_layout(5, num_samples=3)
    q, k, v = make_qkv(layout.num_tokens, 2, 2, 16, torch.float32, 5)
    mask = rule_mask(samples)
    out, lse = packed_attention(q, k, v, layout, scale=0.7, return_lse=True)
    ref, ref_lse = attention64(q, k, v, mask, 0.7)
    assert_close(out, ref, 1e-5, "out scale=0.7")
    assert_close(lse, ref_lse, 1e-5, "lse scale=0.7")
    default = packed_attention(q, k, v, layout)
    assert (default - out).abs().max() > 1e-3, "scale was ignored"


def test_strided_views_of_a_fused_qkv_projection():
    # q, k, v sliced out of one [T, Hq + 2 Hkv, D] projection are non-contiguous.
    layout, samples = random_layout(8, num_samples=4)
    t = layout.num_tokens
    qkv = torch.randn(t, 4 + 2 + 2, 16)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    assert not q.is_contiguous()
    out = packed_attention(q, k, v, layout)
    ref, _ = attention64(q, k, v, rule_mask(samples), 0.25)
    assert out.shape == (t, 4, 16)
    assert_close(out, ref, 1e-5, "out")


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_forward_half_precision(dtype, tol, hq, hkv):
    layout, samples = random_layout(21 + hq + hkv, num_samples=4, pad=True)
    q, k, v = make_qkv(layout.num_tokens, hq, hkv, 24, dtype, 2)
    out, lse = packed_attention(q, k, v, layout, return_lse=True)
    ref, ref_lse = attention64(q, k, v, rule_mask(samples), 24 ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (hq, layout.num_tokens)
    assert_close(out, ref, tol, f"out {dtype}")
    assert_close(lse, ref_lse, 1e-5, f"lse {dtype} (fp32 scores of {dtype} inputs)")


def test_lse_under_autocast_is_fp32_scores_of_the_rounded_operands():
    # autocast casts a matmul's fp32 operands down: an lse computed under it came back
    # bf16, ~1e-3 off, with gradients to match
    layout, samples = random_layout(31, num_samples=3, pad=True)
    q, k, v = make_qkv(layout.num_tokens, 4, 2, 24, torch.float32, 5, requires_grad=True)
    g = torch.Generator().manual_seed(6)
    g_out = torch.randn(layout.num_tokens, 4, 24, generator=g, dtype=torch.float64)
    g_lse = torch.randn(4, layout.num_tokens, generator=g, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = packed_attention(q, k, v, layout, return_lse=True)
        got = torch.autograd.grad((out.double() * g_out).sum() + (lse.double() * g_lse).sum(),
                                  (q, k), retain_graph=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    rounded = [x.detach().bfloat16().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = attention64(*rounded, rule_mask(samples), 24 ** -0.5)
    assert_close(lse, ref_lse, 1e-5, "lse (fp32 scores of the bf16 operands)")
    want = torch.autograd.grad((ref_lse * g_lse).sum(), rounded[:2])
    only_lse = torch.autograd.grad((lse.double() * g_lse).sum(), (q, k))
    for name, a, e in zip(("dq", "dk"), only_lse, want):
        # one bf16 rounding: the gradient flows back through autocast's cast of q / k
        # (it was ~1e-2 off with the scores themselves in bf16)
        assert_close(a, e, 3e-3, f"{name} through lse")
    assert all(torch.isfinite(x).all() for x in got)


# --------------------------------------------------------------------------- backward
def _grads(q, k, v, fn, g_out, g_lse):
    out, lse = fn(q, k, v)
    loss = (out.double() * g_out).sum() + (lse.double() * g_lse).sum()
    return torch.autograd.grad(loss, (q, k, v))


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("d", [16, 24])
@pytest.mark.parametrize("seed", range(2))
def test_backward_fp32(hq, hkv, d, seed):
    layout, samples = random_layout(100 + seed * 13 + d + hq, pad=seed == 0)
    t = layout.num_tokens
    q, k, v = make_qkv(t, hq, hkv, d, torch.float32, seed, requires_grad=True)
    g = torch.Generator().manual_seed(seed + 1)
    g_out = torch.randn(t, hq, d, generator=g, dtype=torch.float64)
    g_lse = torch.randn(hq, t, generator=g, dtype=torch.float64)
    mask = rule_mask(samples)
    got = _grads(q, k, v, lambda *x: packed_attention(*x, layout, return_lse=True), g_out, g_lse)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = _grads(q64, k64, v64, lambda *x: attention64(*x, mask, d ** -0.5), g_out, g_lse)
    for name, a, e in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32
        assert_close(a, e, 1e-5, f"{name} (spans={samples})")


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)])
def test_backward_half_precision(dtype, tol):
    layout, samples = random_layout(77, num_samples=4, pad=True)
    t = layout.num_tokens
    q, k, v = make_qkv(t, 4, 2, 16, dtype, 4, requires_grad=True)
    g_out = torch.randn(t, 4, 16, dtype=torch.float64)
    out = packed_attention(q, k, v, layout)
    got = torch.autograd.grad((out.double() * g_out).sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = attention64(q64, k64, v64, rule_mask(samples), 0.25)
    want = torch.autograd.grad((ref * g_out).sum(), (q64, k64, v64))
    for name, a, e in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == dtype
        assert_close(a, e, tol, f"{name} {dtype}")


def test_deterministic_flag_is_accepted_and_repeatable():
    layout, samples = random_layout(9, num_samples=3)
    q, k, v = make_qkv(layout.num_tokens, 4, 1, 16, torch.float32, 9, requires_grad=True)
    runs = []
    for _ in range(2):
        out = packed_attention(q, k, v, layout, deterministic=True)
        runs.append((out,) + torch.autograd.grad(out.sum(), (q, k, v)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref, _ = attention64(q, k, v, rule_mask(samples), 0.25)
    assert_close(runs[0][0], ref, 1e-5, "out deterministic=True")


# --------------------------------------------------------------------------- host-only bounds
def test_runs_on_meta_tensors_so_never_reads_device_values():
    # On the meta device any read of a tensor's values (.item(), .tolist(), bool()) fails:
    # the per-sample loop must take its bounds from the layout's host copy.
    layout, _ = random_layout(4, num_samples=4)
    meta = layout.to("meta")
    q, k, v = (x.to("meta") for x in make_qkv(layout.num_tokens, 4, 2, 16, torch.float32, 0))
    out, lse = packed_attention(q, k, v, meta, return_lse=True)
    assert out.device.type == "meta" and out.shape == q.shape
    assert lse.device.type == "meta" and lse.shape == (4, layout.num_tokens)


def test_masks_are_built_once_per_layout_and_reused_by_every_layer(monkeypatch):
    # The per-layer loop must not rebuild (or copy to the device) any mask: a layer stack
    # calls the reference many times on one layout, and the masks depend on it alone.
    layout, samples = random_layout(5, num_samples=4)
    built = []
    builder = PackedLayout._mask
    monkeypatch.setattr(PackedLayout, "_mask",
                        lambda self, *a: built.append(a) or builder(self, *a))
    q, k, v = make_qkv(layout.num_tokens, 4, 2, 16, torch.float32, 5)
    outs = [packed_attention(q, k, v, layout, return_lse=True) for _ in range(3)]
    assert len(built) == layout.num_samples, f"{len(built)} masks built for 3 calls"
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])
    ref, ref_lse = attention64(q, k, v, rule_mask(samples), 0.25)
    assert_close(outs[-1][0], ref, 1e-5, "out with cached masks")
    assert_close(outs[-1][1], ref_lse, 1e-5, "lse with cached masks")
    # an equal layout built anew has its own (empty) cache, and gives the same result
    again = PackedLayout.from_spans(samples)
    assert again == layout
    assert torch.equal(packed_attention(q, k, v, again), outs[0][0])
    assert len(built) == 2 * layout.num_samples


# --------------------------------------------------------------------------- errors
def _bad_calls():
    layout = PackedLayout.from_spans([[(3, "full"), (2, "causal")], [(4, "noise")]])  # T = 9
    q, k, v = make_qkv(9, 4, 2, 16, torch.float32, 0)
    return layout, q, k, v


BAD = [
    ("layout", lambda L, q, k, v: ((q, k, v, [(9, "causal")]), {}), TypeError,
     "layout must be a PackedLayout"),
    ("q_not_tensor", lambda L, q, k, v: ((q.numpy(), k, v, L), {}), TypeError,
     "q must be a torch.Tensor"),
    ("q_2d", lambda L, q, k, v: ((q[:, 0], k, v, L), {}), ValueError, "q must have 3 dim"),
    ("k_4d", lambda L, q, k, v: ((q, k[None], v, L), {}), ValueError, "k must have 3 dim"),
    ("q_int", lambda L, q, k, v: ((q.long(), k, v, L), {}), TypeError, "q must have dtype"),
    ("q_fp64", lambda L, q, k, v: ((q.double(), k, v, L), {}), TypeError, "q must have dtype"),
    ("k_dtype", lambda L, q, k, v: ((q, k.half(), v, L), {}), TypeError,
     "k must have q's dtype"),
    ("v_dtype", lambda L, q, k, v: ((q, k, v.bfloat16(), L), {}), TypeError,
     "v must have q's dtype"),
    ("k_device", lambda L, q, k, v: ((q, k.to("meta"), v, L), {}), ValueError,
     "k must be on cpu"),
    ("layout_device", lambda L, q, k, v: ((q, k, v, L.to("meta")), {}), ValueError,
     "layout is on meta but q is on cpu"),
    ("q_tokens", lambda L, q, k, v: ((q[:8], k, v, L), {}), ValueError,
     "q has 8 tokens but the layout holds 9"),
    ("kv_tokens", lambda L, q, k, v: ((q, k[:7], v[:7], L), {}), ValueError,
     "k has 7 tokens but the layout holds 9"),
    ("kv_shape", lambda L, q, k, v: ((q, k, v[:, :1], L), {}), ValueError,
     "k and v must have the same shape"),
    ("head_dim", lambda L, q, k, v: ((q, k[..., :8], v[..., :8], L), {}), ValueError,
     "must have q's head dim D = 16"),
    ("heads", lambda L, q, k, v: ((q[:, :3], k, v, L), {}), ValueError,
     r"q's head count \(3\) must be a multiple of k's and v's \(2\)"),
    ("zero_heads", lambda L, q, k, v: ((q, k[:, :0], v[:, :0], L), {}), ValueError,
     "at least one head"),
    ("scale_zero", lambda L, q, k, v: ((q, k, v, L), {"scale": 0.0}), ValueError,
     "scale must be a finite number > 0"),
    ("scale_negative", lambda L, q, k, v: ((q, k, v, L), {"scale": -0.1}), ValueError,
     "scale must be a finite number > 0"),
    ("scale_nan", lambda L, q, k, v: ((q, k, v, L), {"scale": float("nan")}), ValueError,
     "scale must be a finite number > 0"),
    ("scale_str", lambda L, q, k, v: ((q, k, v, L), {"scale": "0.1"}), TypeError,
     "scale must be a float or None"),
]


@pytest.mark.parametrize("make,exc,match", [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_inputs_raise_naming_the_argument(make, exc, match):
    args, kwargs = make(*_bad_calls())
    with pytest.raises(exc, match=match):
        packed_attention(*args, **kwargs)


def test_public_op_dispatches_to_this_reference():
    import unimrg_fast.reference as reference

    if not hasattr(reference, "packed_attention"):
        pytest.skip("unimrg_fast.reference does not export packed_attention yet")
    from unimrg_fast import packed_attention as public

    layout, samples = random_layout(31, num_samples=3)
    q, k, v = make_qkv(layout.num_tokens, 4, 2, 16, torch.float32, 31)
    out, lse = public(q, k, v, layout, impl="reference", return_lse=True)
    ref, ref_lse = attention64(q, k, v, rule_mask(samples), 0.25)
    assert_close(out, ref, 1e-5, "public out")
    assert_close(lse, ref_lse, 1e-5, "public lse")
