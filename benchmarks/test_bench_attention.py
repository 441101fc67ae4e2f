"""Packed attention on UMM packs: plain reference vs fused Triton vs FlexAttention (and
FlashAttention's speed of light), forward and forward+backward, side by side.

Packs (DESIGN.md section 5), padded with one causal sample to the pack size:
    unimrg  the four UniMRG tasks in equal shares:
            understanding                 [1088 full | 32-512 causal]
            depth / pixel / segmentation  [1088 full | 8-48 causal | 1024 noise]
    sgt     SGT on BAGEL, segmentation 2 : 1 understanding:
            segmentation                  [256 full | 8-48 causal | 1024 noise]
            understanding                 [256 full | 32-512 causal]
Heads 12 q / 2 kv (1.5B) and 28 q / 4 kv (7B), head dim 128, bfloat16.

Variants (one group per pack, heads and pass; ratios are to "reference"):
    reference         per-sample SDPA with dense masks (role baseline)
    triton            the fused kernel (role fused; skipped until it lands)
    flex              FlexAttention, BlockMask built once outside the timed call from the
                      layout's tile metadata (attention_peers.block_mask_from_tiles) (peer)
    flex+mask-build   FlexAttention with its per-pack create_block_mask inside the call (peer;
                      the first build per pack size compiles: ~3 minutes at 16k on an H200)
    flash-causal-sol  flash_attn_varlen_func over the same samples with a plain causal
                      mask: NOT the UMM mask, a speed-of-light reference (peer; needs
                      flash-attn). Its TFLOP/s count its own (causal) pairs.

Useful FLOPs count the allowed (query, key) pairs exactly, from the spans:
    forward     4 * D * Hq * pairs     (Q K^T and P V: 2 matmuls, 2 flop per multiply-add)
    fwd + bwd  12 * D * Hq * pairs     (+ dV, dP, dQ, dK: 4 more matmuls)
FlashAttention's own benchmarks also count recomputing Q K^T in the backward
(bwd = 2.5 x fwd, fwd+bwd = 14 * D * Hq * pairs); we count useful work only, so our
TFLOP/s read lower than theirs for the same time. Ratios do not depend on this.

Group "attention-metadata": what a pack costs before attention runs, 64k tokens:
PackedLayout.from_spans(...) + both tile sets a call builds (.tiles of the forward / dq
and the dk / dv tile sizes, `packed_attention.tile_sizes`; host, one transfer each) vs
flex's create_block_mask (GPU, both directions too), both timed to completion.

Compiling flex (one compile per pack size, head count and grad mode) happens in the
warm-up; a full run takes minutes. Run a subset with -k, e.g. -k "64k and fwd+bwd".
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np
import pytest
import torch

import unimrg_fast as uf
from unimrg_fast import backends
from unimrg_fast.layout import PackedLayout

HEAD_DIM = 128
DTYPE = torch.bfloat16
HEADS = [(12, 2), (28, 4)]
PACKS = [("unimrg", 16384), ("unimrg", 32768), ("unimrg", 65536), ("sgt", 32768)]
PASSES = ["fwd", "fwd+bwd"]
VARIANTS = ["reference", "triton", "flex", "flex+mask-build", "flash-causal-sol"]
ROLES = {"reference": "baseline", "triton": "fused"}
FLOPS_PER_PAIR_PER_DIM = {"fwd": 4, "fwd+bwd": 12}   # see the module docstring
PACK_VARIANTS = ("unimrg", "sgt")


# --------------------------------------------------------------------------- inputs
def _draw_sample(rng: np.random.Generator, variant: str, shrink: int) -> List[Tuple[int, str]]:
    def n(length: int) -> int:
        return max(1, length // shrink)

    if variant == "unimrg":
        if rng.integers(0, 4) == 0:                                     # understanding
            return [(n(1088), "full"), (n(int(rng.integers(32, 513))), "causal")]
        return [(n(1088), "full"), (n(int(rng.integers(8, 49))), "causal"), (n(1024), "noise")]
    if variant == "sgt":
        if rng.random() < 2 / 3:                                        # segmentation
            return [(n(256), "full"), (n(int(rng.integers(8, 49))), "causal"), (n(1024), "noise")]
        return [(n(256), "full"), (n(int(rng.integers(32, 513))), "causal")]
    raise ValueError(f"unknown pack variant {variant!r}; choose one of {', '.join(PACK_VARIANTS)}")


def draw_umm_pack(num_tokens: int, seed: int, variant: str = "unimrg",
                  shrink: int = 1) -> List[List[Tuple[int, str]]]:
    """Samples (lists of (length, mode) spans) drawn like a UniMRG / SGT pack until the
    next one would not fit in `num_tokens`; the caller pads (PackedLayout's pad_to).
    `shrink` divides every span length (at least 1): tiny packs of the same structure."""
    rng = np.random.default_rng(seed)
    samples, used = [], 0
    while True:
        sample = _draw_sample(rng, variant, shrink)
        length = sum(n for n, _ in sample)
        if used + length > num_tokens:
            return samples
        samples.append(sample)
        used += length


def umm_layout(num_tokens: int, seed: int = 0, variant: str = "unimrg", shrink: int = 1,
               device="cpu") -> PackedLayout:
    """draw_umm_pack's samples plus a causal padding sample up to `num_tokens`."""
    return PackedLayout.from_spans(draw_umm_pack(num_tokens, seed, variant, shrink),
                                   pad_to=num_tokens, device=device)


def causal_pairs(layout: PackedLayout, num_samples: Optional[int] = None) -> int:
    """Pairs of a plain per-sample causal mask over the same samples (flash's speed of
    light); `num_samples`: only the first ones (leave the padding sample out, as
    attended_pairs does)."""
    return sum(n * (n + 1) // 2 for n in layout.seqlens[:num_samples])


def attention_flops(pairs: int, num_q_heads: int, head_dim: int, passes: str) -> float:
    return float(FLOPS_PER_PAIR_PER_DIM[passes] * head_dim * num_q_heads * pairs)


def make_inputs(layout: PackedLayout, num_q_heads: int, num_kv_heads: int, head_dim: int,
                dtype: torch.dtype, requires_grad: bool, seed: int = 0):
    """q [T, Hq, D], k and v [T, Hkv, D] and an output gradient, on the layout's device."""
    g = torch.Generator(device=layout.device).manual_seed(seed)
    t = layout.num_tokens

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=layout.device, dtype=torch.float32).to(dtype)

    q, k, v = rand(t, num_q_heads, head_dim), rand(t, num_kv_heads, head_dim), rand(t, num_kv_heads, head_dim)
    for x in (q, k, v):
        x.requires_grad_(requires_grad)
    return q, k, v, rand(t, num_q_heads, head_dim)


def attention_forward(variant: str, layout: PackedLayout) -> Callable:
    """fn(q, k, v) -> out for one benchmark variant. Raises NotImplementedError (triton
    not landed) or ImportError (flash-attn missing) when it cannot run here."""
    if variant in ("reference", "triton"):
        if variant == "triton":
            backends.resolve("packed_attention", "triton", device=layout.device, layout=layout)
        return lambda q, k, v: uf.packed_attention(q, k, v, layout, impl=variant)
    if variant in ("flex", "flex+mask-build"):
        from unimrg_fast.ops import attention_peers as peers

        if variant == "flex":
            # outside the timed call; the same blocks as create_block_mask finds, without
            # its first compiled build (~3 minutes for a 16k pack on an H200, torch 2.11)
            mask = peers.block_mask_from_tiles(layout)
            return lambda q, k, v: peers.flex_with_block_mask(q, k, v, mask)
        return lambda q, k, v: peers.flex_with_block_mask(q, k, v, peers.build_flex_block_mask(layout))
    if variant == "flash-causal-sol":
        from flash_attn import flash_attn_varlen_func

        cu, n = layout.cu_seqlens, layout.max_seqlen
        return lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, n, n, causal=True)
    raise ValueError(f"unknown attention variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def attention_step(forward: Callable, q, k, v, grad_out, passes: str) -> Callable[[], object]:
    """The timed call: forward only, or forward + gradients of q, k, v (torch.autograd.grad,
    so nothing accumulates in .grad between rounds)."""
    if passes == "fwd":
        return lambda: forward(q, k, v)
    if passes == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(q, k, v), (q, k, v), grad_out)
    raise ValueError(f"passes must be one of {', '.join(PASSES)}, got {passes!r}")


def _raise_recompile_limit(limit: int = 64) -> None:
    # One compiled flex per (pack size, heads, grad mode): more than dynamo's default 8
    # entries, after which it would silently run flex eagerly (a [H, T, T] score matrix).
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))


# --------------------------------------------------------------------------- benchmarks
def _pack_id(pack: Tuple[str, int]) -> str:
    return f"{pack[0]}-{pack[1] // 1024}k"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("pack", PACKS, ids=_pack_id)
def test_bench_packed_attention(benchmark, gpu_bench, pack, heads, passes, variant):
    variant_name, num_tokens = pack
    samples = draw_umm_pack(num_tokens, seed=0, variant=variant_name)
    layout = PackedLayout.from_spans(samples, pad_to=num_tokens, device="cuda")
    try:
        forward = attention_forward(variant, layout)
    except NotImplementedError as exc:
        pytest.skip(f"{variant}: {exc}")
    except ImportError as exc:
        pytest.skip(f"{variant}: not installed ({exc})")
    if variant.startswith("flex"):
        _raise_recompile_limit()
    hq, hkv = heads
    q, k, v, grad_out = make_inputs(layout, hq, hkv, HEAD_DIM, DTYPE, passes == "fwd+bwd")
    # useful work: the pairs of the drawn samples, not of the padding sample after them
    pairs = (causal_pairs(layout, len(samples)) if variant == "flash-causal-sol"
             else layout.attended_pairs(len(samples)))
    benchmark.group = f"attention-{_pack_id(pack)}-{hq}q{hkv}kv-{passes}"
    gpu_bench(attention_step(forward, q, k, v, grad_out, passes),
              flops=attention_flops(pairs, hq, HEAD_DIM, passes),
              role=ROLES.get(variant, "peer"), rounds=20, warmup=3,
              num_tokens=num_tokens, num_samples=layout.num_samples, allowed_pairs=pairs,
              density=pairs / num_tokens ** 2, flops_convention=FLOPS_PER_PAIR_PER_DIM[passes])


@pytest.mark.benchmark(group="attention-metadata")
@pytest.mark.parametrize("impl", ["layout+tiles", "flex-create-block-mask"])
def test_bench_attention_metadata_64k(benchmark, gpu_bench, impl):
    num_tokens = 65536
    samples = draw_umm_pack(num_tokens, seed=0, variant="unimrg")
    if impl == "layout+tiles":
        from unimrg_fast.ops.packed_attention import tile_sizes

        # both tile sets a call builds on a new layout (forward / dq and dk / dv), as
        # flex's block mask holds both directions
        fwd, kv = tile_sizes(torch.bfloat16, HEAD_DIM, num_tokens, torch.device("cuda"))

        def build():
            layout = PackedLayout.from_spans(samples, pad_to=num_tokens, device="cuda")
            return layout.tiles(*fwd), layout.tiles(*kv)
        role = "fused"
    else:
        from unimrg_fast.ops.attention_peers import build_flex_block_mask

        layout = PackedLayout.from_spans(samples, pad_to=num_tokens, device="cuda")
        _raise_recompile_limit()

        def build():
            return build_flex_block_mask(layout)
        role = "baseline"
    gpu_bench(build, role=role, rounds=50, warmup=3, num_tokens=num_tokens,
              num_samples=len(samples) + 1)
