"""Packed attention through FlashAttention, xFormers and FlexAttention (ops/attention_peers.py).

CPU lane: flash-attn and xformers are CUDA-only, so their selection and the arguments we
pass them are checked with stand-in modules (as test_backends.py does) whose functions
compute the attention they were asked for, per sample, in float64. FlexAttention runs
eagerly on the CPU (forward only) and is compared with the reference and a float64
oracle built straight from the rule. GPU lane: every peer against float64 at realistic
sizes.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import unimrg_fast as uf
from unimrg_fast import backends
from unimrg_fast.layout import PackedLayout
from unimrg_fast.ops import attention_peers as peers
from numerics import assert_rel, rel_err
from test_reference_attention import FIXED, attention64, make_qkv, random_layout, rule_mask
from stand_ins import absent, fake_module

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    monkeypatch.delenv(backends.ENV_IMPL, raising=False)
    backends.refresh()
    peers.clear_layout_cache()
    table = list(backends._TABLE)
    yield
    backends._TABLE[:] = table
    backends.refresh()
    peers.clear_layout_cache()


# --------------------------------------------------------------------------- layouts
CAUSAL_ONLY = [[(5, "causal")], [(1, "causal")], [(9, "causal")], [(3, "causal")]]
FULL_ONLY = [[(6, "full")], [(4, "noise")], [(1, "full")], [(7, "full")]]
EXPRESSIBLE = {
    "causal": (CAUSAL_ONLY, True),
    "full_and_noise": (FULL_ONLY, False),
    "full_with_one_token_causal_sample": ([[(6, "full")], [(1, "causal")], [(3, "noise")]], False),
    "causal_with_one_token_full_sample": ([[(6, "causal")], [(1, "full")]], True),
}
NOT_EXPRESSIBLE = {
    "image_then_caption": ([[(4, "full"), (3, "causal")], [(5, "causal")]], "sample 0 has 2 spans"),
    "generation_sample": ([[(6, "causal")], [(3, "full"), (2, "causal"), (4, "noise")]],
                          "sample 1 has 3 spans"),
    "full_then_causal_sample": ([[(4, "full")], [(3, "causal")]], "mixes causal samples"),
}


def _layout(samples, **kwargs):
    return PackedLayout.from_spans(samples, **kwargs)


# --------------------------------------------------------------------------- stand-ins
def varlen64(q, k, v, cu_seqlens, scale, causal):
    """Per-sample float64 attention with one causal flag: (out in q's dtype, lse [Hq, T])."""
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs = q[start:end].double().transpose(0, 1)
        ks = k[start:end].double().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:end].double().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) * scale
        if causal:
            n = end - start
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        lses.append(torch.logsumexp(scores, dim=-1))
        outs.append((torch.softmax(scores, dim=-1) @ vs).transpose(0, 1))
    return torch.cat(outs).to(q.dtype), torch.cat(lses, dim=1).float()


class FakeFlash:
    """flash_attn_varlen_func with flash-attn's signature; records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                 softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                 block_table=None):
        self.calls.append(dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q,
                               cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                               max_seqlen_k=max_seqlen_k, dropout_p=dropout_p,
                               softmax_scale=softmax_scale, causal=causal,
                               deterministic=deterministic, return_attn_probs=return_attn_probs))
        assert torch.equal(cu_seqlens_q, cu_seqlens_k)
        out, lse = varlen64(q, k, v, cu_seqlens_q, softmax_scale, causal)
        return (out, lse, torch.empty(0)) if return_attn_probs else out


@pytest.fixture
def fake_flash(monkeypatch):
    fake = FakeFlash()
    fake_module(monkeypatch, "flash_attn", __version__="2.7.4", flash_attn_varlen_func=fake)
    return fake


class FakeXformers:
    """xformers.ops with memory_efficient_attention, fmha.attn_bias and the lse entry point."""

    def __init__(self, monkeypatch):
        self.calls, self.biases = [], []
        fake = self

        class BlockDiagonalMask:
            causal = False

            def __init__(self, seqlens, device):
                self.seqlens, self.device = list(seqlens), device

            @classmethod
            def from_seqlens(cls, q_seqlen, kv_seqlen=None, *, device=None):
                bias = cls(q_seqlen, device)
                fake.biases.append(bias)
                return bias

        class BlockDiagonalCausalMask(BlockDiagonalMask):
            causal = True

        def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *,
                                       op=None):
            self.calls.append(dict(query=query, key=key, value=value, attn_bias=attn_bias,
                                   p=p, scale=scale))
            return self._attend(query, key, value, attn_bias, scale)[0]

        def forward_requires_grad(query, key, value, attn_bias=None, p=0.0, scale=None, *,
                                  op=None):
            out, lse = self._attend(query, key, value, attn_bias, scale)
            return out, lse

        self.attn_bias = types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask,
                                               BlockDiagonalCausalMask=BlockDiagonalCausalMask)
        fmha = types.SimpleNamespace(
            attn_bias=self.attn_bias,
            memory_efficient_attention_forward_requires_grad=forward_requires_grad)
        fake_module(monkeypatch, "xformers", __version__="0.0.29")
        fake_module(monkeypatch, "xformers.ops", memory_efficient_attention=memory_efficient_attention,
                     fmha=fmha)

    @staticmethod
    def _attend(query, key, value, bias, scale):
        # [1, T, H, D] or BMGHK [1, T, G, H, D]; lse like xformers: [1, H, T] / [1, G, H, T].
        assert query.shape[0] == 1
        shape = query.shape
        q, k, v = (x[0].flatten(1, -2) if x.dim() == 5 else x[0] for x in (query, key, value))
        cu = torch.tensor(np.concatenate([[0], np.cumsum(bias.seqlens)]))
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        out, lse = varlen64(q, k, v, cu, scale, bias.causal)
        return out.reshape(shape), lse.reshape(1, *shape[2:-1], -1)


# ------------------------------------------------------------------ (a) what each peer expresses
@pytest.mark.parametrize("name", sorted(EXPRESSIBLE))
@pytest.mark.parametrize("accepts", [peers.flash_accepts, peers.xformers_accepts],
                         ids=["flash", "xformers"])
def test_varlen_peers_accept_one_span_per_sample_uniform_layouts(name, accepts):
    samples, causal = EXPRESSIBLE[name]
    layout = _layout(samples)
    assert accepts(device=CUDA, layout=layout) is None
    assert peers.varlen_mask_kind(layout) == (causal, None)


@pytest.mark.parametrize("name", sorted(NOT_EXPRESSIBLE))
@pytest.mark.parametrize("accepts", [peers.flash_accepts, peers.xformers_accepts],
                         ids=["flash", "xformers"])
def test_varlen_peers_reject_richer_masks_with_a_reason(name, accepts):
    samples, reason = NOT_EXPRESSIBLE[name]
    why = accepts(device=CUDA, layout=_layout(samples))
    assert why is not None and reason in why, why


def test_padding_after_full_samples_makes_the_pack_mixed():
    layout = _layout([[(6, "full")], [(5, "full")]], pad_to=16)      # + 5 causal padding tokens
    why = peers.flash_accepts(device=CUDA, layout=layout)
    assert why is not None and "padding counts as a causal sample" in why
    assert peers.flash_accepts(device=CUDA, layout=_layout([[(6, "full")], [(5, "full")]])) is None


def test_varlen_peers_need_cuda_and_flash_needs_half_precision():
    layout = _layout(CAUSAL_ONLY)
    for accepts in (peers.flash_accepts, peers.xformers_accepts):
        assert "CUDA" in accepts(device=CPU, layout=layout)
        assert "CUDA" in accepts(device=None, layout=layout)
    assert "float16 / bfloat16" in peers.flash_accepts(device=CUDA, layout=layout, dtype=torch.float32)
    assert peers.flash_accepts(device=CUDA, layout=layout, dtype=torch.bfloat16) is None
    assert "deterministic" in peers.xformers_accepts(device=CUDA, layout=layout, deterministic=True)
    for accepts in (peers.flash_accepts, peers.xformers_accepts):   # their lse has no grad
        assert "not differentiable" in accepts(device=CUDA, layout=layout, lse_grad=True)
        assert accepts(device=CUDA, layout=layout, lse_grad=False) is None
    assert peers.flex_accepts(device=CUDA, layout=layout) is None
    assert peers.flex_accepts(device=CPU, layout=layout) is None
    assert peers.flex_accepts(device=torch.device("meta"), layout=layout) is not None


def test_table_order_puts_flash_then_xformers_before_triton_and_flex_off_auto():
    names = [i.name for i in backends.implementations("packed_attention")]
    assert names.index("flash") < names.index("xformers") < names.index("triton")
    assert names.index("triton") < names.index("reference")
    flex = next(i for i in backends.implementations("packed_attention") if i.name == "flex")
    assert flex.auto is False and flex.requires == ("flex_attention",)


def test_auto_picks_flash_only_for_layouts_it_expresses(fake_flash, monkeypatch):
    absent(monkeypatch, "xformers.ops")
    name, fn = backends.resolve("packed_attention", "auto", device=CUDA, layout=_layout(CAUSAL_ONLY))
    assert name == "flash" and fn is peers.flash
    assert backends.resolve("packed_attention", "auto", device=CUDA,
                            layout=_layout(FULL_ONLY))[0] == "flash"
    for samples, _ in NOT_EXPRESSIBLE.values():
        name, _ = backends.resolve("packed_attention", "auto", device=CUDA, layout=_layout(samples))
        assert name in ("triton", "reference"), name        # never flash, never flex
    # On CPU tensors flash is never chosen, whatever the layout.
    assert backends.resolve("packed_attention", "auto", device=CPU,
                            layout=_layout(CAUSAL_ONLY))[0] == "reference"


def test_auto_takes_xformers_when_flash_is_missing_and_flash_when_both(fake_flash, monkeypatch):
    FakeXformers(monkeypatch)
    layout = _layout(CAUSAL_ONLY)
    assert backends.resolve("packed_attention", "auto", device=CUDA, layout=layout)[0] == "flash"
    absent(monkeypatch, "flash_attn")
    backends.refresh()
    name, fn = backends.resolve("packed_attention", "auto", device=CUDA, layout=layout)
    assert name == "xformers" and fn is peers.xformers


def test_auto_skips_flash_for_head_dims_above_256(fake_flash, monkeypatch):
    """flash-attn 2 refuses D > 256 in the call; "auto" must pass it by for the next
    implementation (xformers here) instead of choosing it and failing."""
    FakeXformers(monkeypatch)
    layout = _layout(CAUSAL_ONLY)
    call = dict(device=CUDA, layout=layout, dtype=torch.bfloat16)
    assert peers.flash_accepts(head_dim=256, **call) is None
    assert "D <= 256, got q's D = 264" in peers.flash_accepts(head_dim=264, **call)
    assert backends.resolve("packed_attention", "auto", head_dim=256, **call)[0] == "flash"
    assert backends.resolve("packed_attention", "auto", head_dim=264, **call)[0] == "xformers"
    with pytest.raises(ValueError, match=r"impl='flash'.*D <= 256, got q's D = 264"):
        backends.resolve("packed_attention", "flash", head_dim=264, **call)


def test_auto_passes_flash_by_when_the_lse_needs_a_gradient(fake_flash, monkeypatch):
    """flash's lse is its saved statistics, outside autograd: a loss on it would lose
    that gradient term silently. packed_attention tells `accepts` when it would."""
    FakeXformers(monkeypatch)
    call = dict(device=CUDA, layout=_layout(CAUSAL_ONLY), dtype=torch.bfloat16)
    assert backends.resolve("packed_attention", "auto", lse_grad=False, **call)[0] == "flash"
    assert backends.resolve("packed_attention", "auto", lse_grad=True,
                            **call)[0] in ("triton", "reference")   # never xformers either
    with pytest.raises(ValueError, match=r"impl='flash'.*lse is not differentiable"):
        backends.resolve("packed_attention", "flash", lse_grad=True, **call)

    seen, real = [], backends.resolve
    monkeypatch.setattr(backends, "resolve",
                        lambda *a, **kw: seen.append(kw["lse_grad"]) or real(*a, **kw))
    layout = _layout(CAUSAL_ONLY)
    t = layout.num_tokens
    q, k, v = (torch.randn(t, 2, 8) for _ in range(3))
    uf.packed_attention(q, k, v, layout, return_lse=True)              # no gradient wanted
    uf.packed_attention(q.requires_grad_(), k, v, layout)               # no lse wanted
    uf.packed_attention(q, k, v, layout, return_lse=True)               # both
    with torch.no_grad():
        uf.packed_attention(q, k, v, layout, return_lse=True)
    assert seen == [False, False, True, False]


def test_explicit_flash_on_a_layout_it_cannot_express_raises_the_reason(fake_flash):
    layout = _layout(NOT_EXPRESSIBLE["generation_sample"][0])
    with pytest.raises(ValueError, match=r"impl='flash'.*sample 1 has 3 spans"):
        backends.resolve("packed_attention", "flash", device=CUDA, layout=layout)
    q, k, v = make_qkv(layout.num_tokens, 4, 2, 16, torch.bfloat16, 0)
    with pytest.raises(ValueError, match=r"impl='flash'.*sample 1 has 3 spans"):
        peers.flash(q, k, v, layout)
    assert fake_flash.calls == []


def test_explicit_xformers_on_a_mixed_pack_raises_the_reason(monkeypatch):
    FakeXformers(monkeypatch)
    layout = _layout(NOT_EXPRESSIBLE["full_then_causal_sample"][0])
    with pytest.raises(ValueError, match=r"impl='xformers'.*mixes causal samples"):
        backends.resolve("packed_attention", "xformers", device=CUDA, layout=layout)


def test_missing_flash_says_how_to_install(monkeypatch):
    absent(monkeypatch, "flash_attn")
    with pytest.raises(RuntimeError, match=r"impl='flash'.*unimrg-fast\[flash\]"):
        backends.resolve("packed_attention", "flash", device=CUDA, layout=_layout(CAUSAL_ONLY))


@pytest.mark.parametrize("samples,causal", [EXPRESSIBLE["causal"], EXPRESSIBLE["full_and_noise"]],
                         ids=["causal", "full"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (3, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("scale", [None, 0.7])
def test_flash_passes_varlen_arguments_from_the_layout(fake_flash, samples, causal, hq, hkv, scale):
    layout = _layout(samples)
    q, k, v = make_qkv(layout.num_tokens, hq, hkv, 16, torch.bfloat16, hq + hkv)
    out, lse = peers.flash(q, k, v, layout, scale=scale, return_lse=True, deterministic=True)
    (call,) = fake_flash.calls
    assert call["cu_seqlens_q"].dtype == torch.int32
    assert call["cu_seqlens_q"].tolist() == [0, *np.cumsum(layout.seqlens).tolist()]
    assert call["cu_seqlens_q"] is layout.cu_seqlens                   # no per-call copy
    assert call["max_seqlen_q"] == call["max_seqlen_k"] == max(layout.seqlens)
    assert isinstance(call["max_seqlen_q"], int)
    assert call["causal"] is causal
    assert call["softmax_scale"] == pytest.approx(16 ** -0.5 if scale is None else scale)
    assert call["deterministic"] is True and call["return_attn_probs"] is True
    assert call["dropout_p"] == 0.0
    assert call["q"] is q and call["k"] is k and call["v"] is v        # GQA passed natively
    # The stand-in computes what it was asked; that must be the rule's attention.
    ref, ref_lse = attention64(q, k, v, rule_mask(samples), call["softmax_scale"])
    assert out.dtype == torch.bfloat16 and lse.shape == (hq, layout.num_tokens)
    assert_rel(out, ref, 1e-2, "flash stand-in out")
    assert_rel(lse, ref_lse, 1e-5, "flash stand-in lse")


def test_flash_without_lse_returns_the_output_only(fake_flash):
    layout = _layout(CAUSAL_ONLY)
    q, k, v = make_qkv(layout.num_tokens, 2, 1, 8, torch.float16, 1)
    out = peers.flash(q, k, v, layout)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    assert fake_flash.calls[0]["return_attn_probs"] is False
    assert fake_flash.calls[0]["deterministic"] is False


def test_flash_refuses_float32_and_checks_inputs_like_the_reference(fake_flash):
    layout = _layout(CAUSAL_ONLY)
    q, k, v = make_qkv(layout.num_tokens, 2, 1, 8, torch.float32, 1)
    with pytest.raises(TypeError, match="float16 / bfloat16"):
        peers.flash(q, k, v, layout)
    with pytest.raises(ValueError, match="q has 17 tokens but the layout holds 18"):
        peers.flash(q.half()[:17], k.half(), v.half(), layout)
    assert fake_flash.calls == []


def test_flash_unpads_a_per_sample_lse_from_older_versions(monkeypatch):
    layout = _layout(CAUSAL_ONLY)

    def old_flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None,
                  causal=False, deterministic=False, return_attn_probs=False, **_):
        out, lse = varlen64(q, k, v, cu_q, softmax_scale, causal)
        padded = torch.full((len(layout.seqlens), q.shape[1], max_q + 3), float("nan"))
        for s, (a, n) in enumerate(zip(cu_q.tolist(), layout.seqlens)):
            padded[s, :, :n] = lse[:, a:a + n]
        return out, padded, None

    fake_module(monkeypatch, "flash_attn", flash_attn_varlen_func=old_flash)
    q, k, v = make_qkv(layout.num_tokens, 2, 2, 8, torch.float16, 2)
    _, lse = peers.flash(q, k, v, layout, return_lse=True)
    _, want = varlen64(q, k, v, layout.cu_seqlens, 8 ** -0.5, True)
    assert_rel(lse, want, 1e-6, "unpadded lse")


@pytest.mark.parametrize("samples,causal", [EXPRESSIBLE["causal"], EXPRESSIBLE["full_and_noise"]],
                         ids=["causal", "full"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_xformers_builds_block_diagonal_masks_and_bmghk_views(monkeypatch, samples, causal, hq, hkv):
    fake = FakeXformers(monkeypatch)
    layout = _layout(samples)
    q, k, v = make_qkv(layout.num_tokens, hq, hkv, 16, torch.float32, 3)
    out, lse = peers.xformers(q, k, v, layout, scale=0.5, return_lse=True)
    (call,) = fake.calls
    bias = call["attn_bias"]
    assert bias.causal is causal and bias.seqlens == list(layout.seqlens)
    assert bias.device == layout.device and call["scale"] == 0.5
    if hq == hkv:
        assert call["query"].shape == (1, layout.num_tokens, hq, 16)
    else:  # BMGHK: q [1, T, Hkv, group, D]; k, v expanded over the group without a copy
        group = hq // hkv
        assert call["query"].shape == (1, layout.num_tokens, hkv, group, 16)
        assert call["key"].shape == call["query"].shape and call["key"].stride(3) == 0
    ref, ref_lse = attention64(q, k, v, rule_mask(samples), 0.5)
    assert out.shape == q.shape and lse.shape == (hq, layout.num_tokens)
    assert_rel(out, ref, 1e-5, "xformers stand-in out")
    assert_rel(lse, ref_lse, 1e-5, "xformers stand-in lse")
    # The bias is built once per layout, then reused (every layer of a step).
    peers.xformers(q, k, v, layout)
    assert len(fake.biases) == 1


def test_xformers_refuses_deterministic_backward(monkeypatch):
    FakeXformers(monkeypatch)
    layout = _layout(CAUSAL_ONLY)
    q, k, v = make_qkv(layout.num_tokens, 2, 1, 8, torch.float32, 1, requires_grad=True)
    with pytest.raises(ValueError, match="no deterministic backward"):
        peers.xformers(q, k, v, layout, deterministic=True)
    with torch.no_grad():                       # forward only: nothing to be nondeterministic
        peers.xformers(q, k, v, layout, deterministic=True)


# ------------------------------------------------------------------ (b) flex on the CPU
def _flex_runs_on_cpu():
    try:
        layout = _layout([[(3, "full"), (2, "causal")]])
        q, k, v = make_qkv(5, 2, 1, 16, torch.float32, 0)
        peers.flex(q, k, v, layout)
    except Exception as exc:  # torch without a CPU flex path
        return f"flex_attention does not run on CPU in torch {torch.__version__}: {exc}"
    finally:
        peers.clear_layout_cache()
    return None


_FLEX_CPU_SKIP = _flex_runs_on_cpu()
needs_cpu_flex = pytest.mark.skipif(_FLEX_CPU_SKIP is not None, reason=str(_FLEX_CPU_SKIP))


@needs_cpu_flex
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (3, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("seed", range(3))
def test_flex_matches_float64_on_random_layouts(hq, hkv, seed):
    layout, samples = random_layout(500 + seed * 11 + hq)
    q, k, v = make_qkv(layout.num_tokens, hq, hkv, 16, torch.float32, seed)
    out, lse = uf.packed_attention(q, k, v, layout, impl="flex", return_lse=True)
    ref, ref_lse = attention64(q, k, v, rule_mask(samples), 0.25)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_rel(out, ref, 1e-5, f"flex out (spans={samples})")
    assert_rel(lse, ref_lse, 1e-5, f"flex lse (spans={samples})")


@needs_cpu_flex
@pytest.mark.parametrize("name", sorted(FIXED))
def test_flex_matches_float64_on_corner_layouts(name):
    samples = FIXED[name]
    layout = _layout(samples)
    q, k, v = make_qkv(layout.num_tokens, 4, 2, 16, torch.float32, 3)
    out, lse = peers.flex(q, k, v, layout, scale=0.3, return_lse=True)
    ref, ref_lse = attention64(q, k, v, rule_mask(samples), 0.3)
    assert_rel(out, ref, 1e-5, f"flex out [{name}]")
    assert_rel(lse, ref_lse, 1e-5, f"flex lse [{name}]")


@needs_cpu_flex
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flex_half_precision_is_as_close_to_float64_as_the_reference(dtype):
    # FlashAttention's rule (DESIGN.md 4): error to fp64 at most 2x the same-dtype
    # reference's, plus a small floor.
    layout, samples = random_layout(42, num_samples=4, pad=True)
    q, k, v = make_qkv(layout.num_tokens, 4, 2, 16, dtype, 4)
    ref64, _ = attention64(q, k, v, rule_mask(samples), 0.25)
    got = peers.flex(q, k, v, layout)
    plain = uf.packed_attention(q, k, v, layout, impl="reference")
    assert got.dtype == dtype and got.shape == q.shape
    assert torch.isfinite(got).all()
    err, base = rel_err(got, ref64), rel_err(plain, ref64)
    assert err <= 2 * base + 1e-3, f"flex {dtype}: {err:.2e} vs reference {base:.2e}"


@needs_cpu_flex
def test_flex_mask_mod_is_the_rule():
    from torch.nn.attention.flex_attention import create_mask

    for seed in range(4):
        layout, samples = random_layout(900 + seed)
        t = layout.num_tokens
        dense = create_mask(peers.flex_mask_mod(layout), None, None, t, t, device="cpu")
        assert torch.equal(dense[0, 0], rule_mask(samples)), f"spans={samples}"


def test_flex_has_no_cpu_backward_and_says_so():
    layout = _layout([[(3, "full"), (2, "causal")]])
    q, k, v = make_qkv(5, 2, 1, 16, torch.float32, 0, requires_grad=True)
    with pytest.raises(NotImplementedError, match="impl='flex'.*no backward on cpu"):
        peers.flex(q, k, v, layout)


def test_flex_is_never_chosen_by_auto_but_can_be_asked_for():
    layout = _layout([[(3, "full"), (2, "causal")]])
    for device in (CPU, CUDA):
        assert backends.resolve("packed_attention", "auto", device=device, layout=layout)[0] != "flex"
    name, fn = backends.resolve("packed_attention", "flex", device=CPU, layout=layout)
    assert name == "flex" and fn is peers.flex


# ------------------------------------------------------------------ (c) BlockMask cache
@needs_cpu_flex
def test_flex_block_mask_is_built_once_per_layout(monkeypatch):
    builds = []
    real = peers.block_mask_from_tiles

    def counting(layout, block_size=128):
        builds.append(layout)
        return real(layout, block_size)

    monkeypatch.setattr(peers, "block_mask_from_tiles", counting)
    samples = [[(7, "full"), (3, "causal"), (6, "noise")], [(5, "causal")]]
    layout = _layout(samples)
    first = peers.flex_block_mask(layout)
    assert peers.flex_block_mask(layout) is first
    assert peers.flex_block_mask(_layout(samples)) is first         # equal content, same entry
    q, k, v = make_qkv(layout.num_tokens, 2, 1, 16, torch.float32, 0)
    for _ in range(3):                                               # every layer of a step
        peers.flex(q, k, v, layout)
    assert len(builds) == 1
    other = peers.flex_block_mask(_layout([[(21, "causal")]]))
    assert other is not first and len(builds) == 2
    assert peers.flex_block_mask(layout, block_size=64) is not first and len(builds) == 3


@needs_cpu_flex
def test_flex_block_mask_cache_is_a_small_lru():
    layouts = [_layout([[(n, "causal")], [(3, "full")]]) for n in range(1, 12)]
    masks = [peers.flex_block_mask(layout) for layout in layouts]
    assert peers.flex_block_mask(layouts[-1]) is masks[-1]           # recent: kept
    assert peers.flex_block_mask(layouts[0]) is not masks[0]         # oldest: evicted, rebuilt
    peers.clear_layout_cache()
    assert peers.flex_block_mask(layouts[-1]) is not masks[-1]


def _blocks(num_blocks: torch.Tensor, indices: torch.Tensor) -> set:
    """{(query block, key block)} of a BlockMask's (num, indices) pair."""
    num, idx = num_blocks[0, 0].tolist(), indices[0, 0].tolist()
    return {(i, j) for i, (n, row) in enumerate(zip(num, idx)) for j in row[:n]}


@needs_cpu_flex
@pytest.mark.parametrize("block_size", [128, 16, 5])
def test_block_mask_from_tiles_is_what_create_block_mask_finds(block_size):
    # the same partial blocks (mask_mod applied) and full blocks (skipped mask), odd pack
    # lengths and partial last blocks included, whichever way each is built
    layouts = [random_layout(700 + seed)[0] for seed in range(6)]
    layouts += [_layout(samples) for samples in FIXED.values()]
    layouts.append(PackedLayout.from_spans([[(300, "full"), (40, "causal"), (250, "noise")],
                                            [(90, "causal")]], pad_to=700))
    for layout in layouts:
        ours = peers.block_mask_from_tiles(layout, block_size)
        theirs = peers.build_flex_block_mask(layout, block_size)
        assert ours.seq_lengths == theirs.seq_lengths
        assert _blocks(ours.kv_num_blocks, ours.kv_indices) == \
            _blocks(theirs.kv_num_blocks, theirs.kv_indices), layout
        assert _blocks(ours.full_kv_num_blocks, ours.full_kv_indices) == \
            _blocks(theirs.full_kv_num_blocks, theirs.full_kv_indices), layout
        # and the transposed (key-side) structure flex derives for the backward
        assert torch.equal(ours.to_dense(), theirs.to_dense())


@needs_cpu_flex
def test_build_flex_block_mask_never_caches():
    layout = _layout([[(4, "full"), (4, "causal")]])
    assert peers.build_flex_block_mask(layout) is not peers.build_flex_block_mask(layout)


# ------------------------------------------------------------------ GPU lane
def _umm_samples(num_tokens, seed):
    """A realistic pack: UniMRG generation and understanding samples, then padding."""
    rng = np.random.default_rng(seed)
    samples, used = [], 0
    while True:
        if rng.random() < 0.75:
            sample = [(1088, "full"), (int(rng.integers(8, 49)), "causal"), (1024, "noise")]
        else:
            sample = [(1088, "full"), (int(rng.integers(32, 513)), "causal")]
        n = sum(length for length, _ in sample)
        if used + n > num_tokens:
            return samples
        samples.append(sample)
        used += n


def _per_sample64(q, k, v, layout, scale):
    """Float64 attention per sample with the layout's sample masks: (out, lse [Hq, T])."""
    group = q.shape[1] // k.shape[1]
    outs, lses, start = [], [], 0
    for s, n in enumerate(layout.seqlens):
        qs = q[start:start + n].double().transpose(0, 1)
        ks = k[start:start + n].double().repeat_interleave(group, 1).transpose(0, 1)
        vs = v[start:start + n].double().repeat_interleave(group, 1).transpose(0, 1)
        scores = (qs @ ks.transpose(1, 2) * scale).masked_fill(~layout.sample_mask(s), float("-inf"))
        lses.append(torch.logsumexp(scores, -1))
        outs.append((torch.softmax(scores, -1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(outs), torch.cat(lses, 1)


def _check_against_float64(impl, layout, hq, hkv, d=128, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = layout.num_tokens
    q, k, v = (torch.randn(t, h, d, device="cuda", generator=g).to(dtype).requires_grad_()
               for h in (hq, hkv, hkv))
    grad_out = torch.randn(t, hq, d, device="cuda", generator=g).to(dtype)
    results = {}
    for name in (impl, "reference"):
        out, lse = uf.packed_attention(q, k, v, layout, impl=name, return_lse=True)
        results[name] = (out, lse) + torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out64, lse64 = _per_sample64(q64, k64, v64, layout, d ** -0.5)
    want = (out64, lse64) + torch.autograd.grad(out64, (q64, k64, v64), grad_out.double())
    for i, what in enumerate(("out", "lse", "dq", "dk", "dv")):
        got, plain = results[impl][i], results["reference"][i]
        assert torch.isfinite(got).all(), f"{impl} {what}: non-finite"
        err, base = rel_err(got, want[i]), rel_err(plain, want[i])
        assert err <= 2 * base + 2e-3, f"{impl} {what}: {err:.2e} vs reference {base:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(12, 2), (28, 4)])
def test_gpu_flex_matches_float64_on_a_umm_pack(hq, hkv):
    layout = PackedLayout.from_spans(_umm_samples(8192, hq), pad_to=8192, device="cuda")
    _check_against_float64("flex", layout, hq, hkv)


@pytest.mark.gpu
@pytest.mark.parametrize("impl,probe", [("flash", backends.flash_attn), ("xformers", backends.xformers)])
@pytest.mark.parametrize("kind", ["causal", "full"])
def test_gpu_varlen_peers_match_float64(impl, probe, kind):
    if not probe().available:
        pytest.skip(f"{impl} is not installed: {probe().detail}")
    rng = np.random.default_rng(7)
    lengths = [int(n) for n in rng.integers(1, 1500, 6)] + [1, 129]
    samples = [[(n, kind)] for n in lengths]
    layout = PackedLayout.from_spans(samples, device="cuda")
    assert backends.resolve("packed_attention", "auto", device=layout.device,
                            layout=layout)[0] in ("flash", "xformers")
    _check_against_float64(impl, layout, 12, 2)
