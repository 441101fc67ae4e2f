"""Packed attention through public peers: FlashAttention, xFormers, FlexAttention.

Each function has the reference's signature
``(q, k, v, layout, *, scale=None, return_lse=False, deterministic=False)`` and its
semantics (DESIGN.md 3.4 / 3.5); `backends.py` registers them as impl="flash",
"xformers" and "flex". The optional packages are imported inside the functions, never
at module import.

What each can express::

    flash / xformers   one span per sample, and every sample causal, or every sample
                       full (a lone noise span behaves like a full one):
                           [c c c][c c][c c c c]      [f f f][n n][f f f f]
                       not [f f | c c] (an image then its caption) and not a pack whose
                       padding (a causal sample) follows full samples.
    flex               the whole rule, through a mask_mod over the layout's per-token
                       sample / span / mode ids and a BlockMask built once per layout.

Length-1 samples are both causal and full, so they never make a pack mixed.
"""
from __future__ import annotations

import collections
import threading
import warnings
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from unimrg_fast.layout import CAUSAL, MODES, NOISE, PackedLayout, arrays_to_device
from unimrg_fast.reference.attention import _check_inputs

__all__ = ["flash", "xformers", "flex", "flash_accepts", "xformers_accepts", "flex_accepts",
           "varlen_mask_kind", "flex_mask_mod", "flex_block_mask", "build_flex_block_mask",
           "flex_with_block_mask", "clear_layout_cache"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256   # flash-attn 2 refuses larger heads ("... at most 256")


# ------------------------------------------------------------------ what varlen kernels express
# spans -> (causal, reason). A plain dict, not functools.lru_cache: resolve() and its
# predicates may run under torch.compile tracing, which mistrusts lru_cache wrappers.
_varlen_kinds: dict = {}


def _varlen_kind_of_spans(spans) -> Tuple[Optional[bool], Optional[str]]:
    kind = _varlen_kinds.get(spans)
    if kind is None:
        if len(_varlen_kinds) >= 256:
            _varlen_kinds.clear()
        kind = _varlen_kinds[spans] = _scan_varlen_kind(spans)
    return kind


def _scan_varlen_kind(spans) -> Tuple[Optional[bool], Optional[str]]:
    causal_at = full_at = None
    for s, sample in enumerate(spans):
        if len(sample) > 1:
            shown = " | ".join(f"{n} {MODES[m]}" for n, m in sample[:4])
            more = " | ..." if len(sample) > 4 else ""
            return None, (f"sample {s} has {len(sample)} spans [{shown}{more}]; a varlen kernel's "
                          f"causal flag covers one span per sample (use impl='triton' or 'flex')")
        length, mode = sample[0]
        if length == 1:
            continue  # a single token sees itself under either mask
        if mode == CAUSAL:
            causal_at = s if causal_at is None else causal_at
        else:
            full_at = s if full_at is None else full_at
        if causal_at is not None and full_at is not None:
            return None, (f"the pack mixes causal samples (sample {causal_at}) with full/noise "
                          f"samples (sample {full_at}); a varlen kernel takes one causal flag for "
                          f"the whole pack (padding counts as a causal sample)")
    return causal_at is not None, None


def varlen_mask_kind(layout: PackedLayout) -> Tuple[Optional[bool], Optional[str]]:
    """(causal, None) when one varlen call with that causal flag computes the layout's mask,
    else (None, reason). A pack of length-1 samples only is reported as not causal."""
    if not isinstance(layout, PackedLayout):
        return None, f"layout must be a PackedLayout, got {type(layout).__name__}"
    return _varlen_kind_of_spans(layout.spans)


def _varlen_accepts(package: str, device, layout, dtype=None, extra=None,
                    lse_grad: Optional[bool] = None) -> Optional[str]:
    if lse_grad:   # both return their saved statistics, outside autograd
        return (f"{package}'s lse is not differentiable (return_lse=True with inputs that "
                f"need gradients); impl='triton' or 'reference' differentiate it")
    if device is None or torch.device(device).type != "cuda":
        where = "no device given" if device is None else f"tensors on {torch.device(device).type}"
        return f"{package} runs on CUDA tensors only ({where})"
    if layout is None:
        return f"{package} needs the call's layout to decide whether it can express the mask"
    _, why = varlen_mask_kind(layout)
    if why is not None:
        return why
    return extra(dtype) if extra is not None else None


def _flash_dtype(dtype) -> Optional[str]:
    if dtype is not None and dtype not in _HALF_DTYPES:
        return f"flash-attn takes float16 / bfloat16 inputs, got {dtype}"
    return None


def _flash_head_dim(head_dim) -> Optional[str]:
    if head_dim is not None and head_dim > FLASH_MAX_HEAD_DIM:
        return f"flash-attn takes head dims D <= {FLASH_MAX_HEAD_DIM}, got q's D = {head_dim}"
    return None


def flash_accepts(device: Optional[torch.device] = None, layout: Optional[PackedLayout] = None,
                  dtype: Optional[torch.dtype] = None, head_dim: Optional[int] = None,
                  lse_grad: Optional[bool] = None, **_) -> Optional[str]:
    """None when flash_attn_varlen_func computes this call exactly, else why not.

    `dtype`, `head_dim` and `lse_grad` are optional: when the caller passes them, float32,
    head dims above 256 and a differentiable lse (return_lse with inputs that need
    gradients: flash's lse gets none) are refused here, so "auto" falls back instead of
    failing inside the call or dropping the lse's gradient."""
    return _varlen_accepts("flash-attn", device, layout, dtype,
                           lambda dtype: _flash_dtype(dtype) or _flash_head_dim(head_dim),
                           lse_grad)


def xformers_accepts(device: Optional[torch.device] = None,
                     layout: Optional[PackedLayout] = None,
                     deterministic: Optional[bool] = None, lse_grad: Optional[bool] = None,
                     **_) -> Optional[str]:
    """None when xformers' BlockDiagonal(Causal)Mask computes this call exactly, else why not.

    `deterministic` and `lse_grad` are optional: when the caller passes True, they are
    refused here (xformers has no deterministic backward, and its lse no gradient)."""
    extra = ((lambda _dtype: "xformers has no deterministic backward (deterministic=True)")
             if deterministic else None)
    return _varlen_accepts("xformers", device, layout, None, extra, lse_grad)


def flex_accepts(device: Optional[torch.device] = None, layout: Optional[PackedLayout] = None,
                 **_) -> Optional[str]:
    """FlexAttention expresses every layout. CUDA runs compiled kernels (forward and
    backward); CPU runs flex's eager forward (no backward on CPU, no fused kernel)."""
    if device is None:
        return "flex needs the call's device"
    if torch.device(device).type not in ("cuda", "cpu"):
        return f"flex runs on CUDA (compiled) or CPU (eager, forward only), got {device}"
    return None


def _check_varlen_call(name: str, q, k, v, layout, scale) -> bool:
    """Input checks shared with the reference, then the mask check; returns the causal flag."""
    _check_inputs(q, k, v, layout, scale)
    causal, why = varlen_mask_kind(layout)
    if why is not None:
        raise ValueError(f"packed_attention(impl={name!r}) cannot compute this layout: {why}")
    return bool(causal)


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _unpad_lse(lse: torch.Tensor, layout: PackedLayout, num_heads: int, who: str) -> torch.Tensor:
    """[Hq, T] fp32 from a kernel's lse: unpadded [Hq, T] / [1, Hq, T] / [1, G, H, T], or
    padded per sample [S, Hq, >= max_seqlen] (older flash-attn and xformers ops)."""
    t = layout.num_tokens
    if lse.dim() == 4:                                      # xformers BMGHK: [B, G, H, M]
        lse = lse.flatten(1, 2)
    if lse.dim() == 3 and lse.shape[0] == 1 and lse.shape[1:] == (num_heads, t):
        lse = lse[0]
    if lse.shape == (num_heads, t):
        return lse.float()
    if (lse.dim() == 3 and lse.shape[0] == layout.num_samples and lse.shape[1] == num_heads
            and lse.shape[2] >= layout.max_seqlen):
        return torch.cat([lse[s, :, :n] for s, n in enumerate(layout.seqlens)], dim=1).float()
    raise RuntimeError(f"{who} returned an lse of shape {tuple(lse.shape)}; expected [Hq, T] = "
                       f"[{num_heads}, {t}] or per-sample padded [S, Hq, max_seqlen]")


# ------------------------------------------------------------------ FlashAttention
def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, *,
          scale: Optional[float] = None, return_lse: bool = False, deterministic: bool = False):
    """Packed attention with flash-attn's ``flash_attn_varlen_func`` (one call per pack).

    Args:
        q: [T, Hq, D] float16 / bfloat16 on CUDA; k, v: [T, Hkv, D] (GQA / MQA native).
        layout: one span per sample, all causal or all full/noise (see flash_accepts).
        scale: softmax scale, default D ** -0.5.
        return_lse: also return lse [Hq, T] fp32 (flash's saved statistics: not
            differentiable, unlike the reference's).
        deterministic: flash-attn's deterministic backward (slower, more memory).

    The call is ``flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen,
    max_seqlen, softmax_scale=scale, causal=..., deterministic=...,
    return_attn_probs=return_lse)`` with the layout's int32 ``cu_seqlens``; no host sync.
    """
    causal = _check_varlen_call("flash", q, k, v, layout, scale)
    why = _flash_dtype(q.dtype)
    if why is not None:
        raise TypeError(f"packed_attention(impl='flash'): {why}; use impl='triton' or "
                        f"'reference' for float32")
    from flash_attn import flash_attn_varlen_func

    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    cu_seqlens = layout.cu_seqlens
    result = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, layout.max_seqlen,
                                    layout.max_seqlen, dropout_p=0.0, softmax_scale=scale,
                                    causal=causal, deterministic=deterministic,
                                    return_attn_probs=return_lse)
    if not return_lse:
        return result
    out, lse = result[0], result[1]
    return out, _unpad_lse(lse, layout, q.shape[1], "flash_attn_varlen_func")


# ------------------------------------------------------------------ xFormers
def xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, *,
             scale: Optional[float] = None, return_lse: bool = False,
             deterministic: bool = False):
    """Packed attention with ``xformers.ops.memory_efficient_attention`` and a
    ``BlockDiagonalMask`` / ``BlockDiagonalCausalMask`` from the layout's sample lengths.

    Args as for `flash`; float32 / float16 / bfloat16. GQA / MQA go through xformers'
    5-D BMGHK layout (q [1, T, Hkv, Hq/Hkv, D], k and v expanded over the group without a
    copy). return_lse runs one more forward (memory_efficient_attention_forward_requires_grad)
    without autograd. deterministic=True with gradients raises: xformers has no
    deterministic backward.
    """
    causal = _check_varlen_call("xformers", q, k, v, layout, scale)
    if deterministic and _grad_needed(q, k, v):
        raise ValueError("packed_attention(impl='xformers') has no deterministic backward; "
                         "use impl='flash', 'triton' or 'reference' with deterministic=True")
    import xformers.ops as xops

    bias = _layout_cached(("xformers-bias", causal), layout,
                          lambda: _xformers_bias(xops, layout, causal))
    t, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    if group == 1:
        qx, kx, vx = q[None], k[None], v[None]                        # [1, T, H, D]
    else:
        qx = q.unflatten(1, (hkv, group))[None]                       # [1, T, G, H, D]
        kx = k[:, :, None].expand(t, hkv, group, d)[None]
        vx = v[:, :, None].expand(t, hkv, group, d)[None]
    out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, scale=scale)
    out = out.reshape(t, hq, d)
    if not return_lse:
        return out
    with torch.no_grad():
        _, lse = xops.fmha.memory_efficient_attention_forward_requires_grad(
            qx.detach(), kx.detach(), vx.detach(), attn_bias=bias, scale=scale)
    return out, _unpad_lse(lse, layout, hq, "xformers")


def _xformers_bias(xops, layout: PackedLayout, causal: bool):
    cls = (xops.fmha.attn_bias.BlockDiagonalCausalMask if causal
           else xops.fmha.attn_bias.BlockDiagonalMask)
    seqlens = list(layout.seqlens)
    try:
        return cls.from_seqlens(seqlens, device=layout.device)
    except TypeError:  # xformers before from_seqlens(..., device=) builds on the host
        return cls.from_seqlens(seqlens)


# ------------------------------------------------------------------ FlexAttention
def flex_mask_mod(layout: PackedLayout) -> Callable:
    """The rule of DESIGN.md 3.4 as a flex mask_mod over per-token int32 ids on the
    layout's device. Every layout yields the same code over three [T] tensors, so a
    compiled flex sees a new pack of the same size as new inputs, not new code."""
    token_sample = layout.token_sample
    token_span = layout.token_span
    token_mode = layout.span_modes[layout.token_span.long()]          # [T] int32

    def mask_mod(b, h, q_idx, kv_idx):
        same_span = token_span[q_idx] == token_span[kv_idx]
        same_sample = token_sample[q_idx] == token_sample[kv_idx]
        ordered = (kv_idx <= q_idx) | (same_span & (token_mode[q_idx] != CAUSAL))
        key_visible = (token_mode[kv_idx] != NOISE) | same_span
        return same_sample & ordered & key_visible

    return mask_mod


def build_flex_block_mask(layout: PackedLayout, block_size: int = 128):
    """A fresh flex BlockMask for the layout (no cache): what a per-pack build costs.

    On CUDA the mask is built by flex's compiled path (``_compile=True``), which never
    holds the [T, T] mask; on CPU by its eager path (small packs only)."""
    from torch.nn.attention.flex_attention import create_block_mask

    t = layout.num_tokens
    return create_block_mask(flex_mask_mod(layout), B=None, H=None, Q_LEN=t, KV_LEN=t,
                             device=layout.device, BLOCK_SIZE=block_size,
                             _compile=layout.device.type == "cuda")


def _padded_rows(rows: np.ndarray, cols: np.ndarray, num_rows: int, num_cols: int):
    """(counts [num_rows], indices [num_rows, num_cols]) of a row-sorted (row, col) list:
    each row's columns first, in order, zeros after (flex's kv_num_blocks / kv_indices)."""
    counts = np.bincount(rows, minlength=num_rows).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    indices = np.zeros((num_rows, num_cols), dtype=np.int32)
    indices[rows, np.arange(rows.shape[0]) - starts[rows]] = cols
    return counts, indices


def block_mask_from_tiles(layout: PackedLayout, block_size: int = 128):
    """The layout's flex BlockMask from its own tile metadata (`layout.tiles`): the key
    tiles each query tile visits, split into partial ones (flex applies the mask_mod) and
    full ones (it does not), as create_block_mask would find by evaluating the mask_mod
    over every pair. Built on the host from the spans, in milliseconds, and copied once:
    on an H200 (torch 2.11) create_block_mask's first build of a 16k pack took ~3
    minutes."""
    from torch.nn.attention.flex_attention import BlockMask

    tiles = layout.tiles_host(block_size, block_size)
    num_q = len(tiles["q_tile_ptr"]) - 1
    num_k = -(-layout.num_tokens // block_size)
    rows = np.repeat(np.arange(num_q), np.diff(tiles["q_tile_ptr"]))
    full = tiles["k_tile_full"].astype(bool)
    parts = [_padded_rows(rows[sel], tiles["k_tile_idx"][sel], num_q, num_k)
             for sel in (~full, full)]
    host = [a for part in parts for a in part]   # counts, indices, full ones: one copy
    counts, indices, full_counts, full_indices = (
        x.view(1, 1, *a.shape) for x, a in zip(arrays_to_device(host, layout.device), host))
    t = layout.num_tokens
    args = (counts, indices, full_counts, full_indices)
    kwargs = dict(BLOCK_SIZE=block_size, mask_mod=flex_mask_mod(layout))
    try:
        return BlockMask.from_kv_blocks(*args, **kwargs, seq_lengths=(t, t))
    except TypeError:   # a torch before seq_lengths: the lengths are the blocks' span
        return BlockMask.from_kv_blocks(*args, **kwargs)


def flex_block_mask(layout: PackedLayout, block_size: int = 128):
    """The layout's flex BlockMask (block_mask_from_tiles), built once and kept in a
    small LRU keyed by the layout (layouts hash by content), so every layer of a step
    reuses one build."""
    return _layout_cached(("flex-block-mask", block_size), layout,
                          lambda: block_mask_from_tiles(layout, block_size))


_compiled_flex = None
_compile_lock = threading.Lock()


def _flex_fn(device: torch.device) -> Callable:
    """Compiled flex_attention on CUDA (compiled once per process, lazily); the eager one
    elsewhere. Eager flex materialises the [H, T, T] scores: small packs only."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    global _compiled_flex
    with _compile_lock:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_with_block_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, *,
                         scale: Optional[float] = None, return_lse: bool = False):
    """flex_attention on [T, H, D] tensors with a prebuilt BlockMask (see flex_block_mask).
    Returns out [T, Hq, D] (and lse [Hq, T] fp32)."""
    fn = _flex_fn(q.device)
    qf, kf, vf = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))   # [1, H, T, D]
    kwargs = dict(block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    with warnings.catch_warnings():
        # Eager flex on CPU is deliberate (tests, small packs): silence its compile advice.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        if not return_lse:
            return fn(qf, kf, vf, **kwargs)[0].transpose(0, 1).contiguous()
        aux_request = _aux_request()
        if aux_request is not None:
            out, aux = fn(qf, kf, vf, return_aux=aux_request(lse=True), **kwargs)
            lse = aux.lse
        else:  # torch < 2.9: return_lse (deprecated later in favour of return_aux)
            out, lse = fn(qf, kf, vf, return_lse=True, **kwargs)
    return out[0].transpose(0, 1).contiguous(), lse[0].float()


def _aux_request():
    try:  # torch >= 2.9
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return None
    return AuxRequest


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, *,
         scale: Optional[float] = None, return_lse: bool = False, deterministic: bool = False):
    """Packed attention with torch's FlexAttention under the full rule of DESIGN.md 3.4.

    Args as for the reference; float32 / float16 / bfloat16; GQA via enable_gqa.
    The BlockMask comes from flex_block_mask(layout) (cached per layout); on CUDA
    flex_attention is compiled once (dynamic=False: one compile per pack size and head
    shape). On CPU flex runs eagerly and has no backward: requiring gradients raises.
    `deterministic` needs nothing here: flex's backward writes dQ and dK/dV from separate
    programs without atomics.
    """
    _check_inputs(q, k, v, layout, scale)
    if q.device.type != "cuda" and _grad_needed(q, k, v):
        raise NotImplementedError(f"packed_attention(impl='flex') has no backward on "
                                  f"{q.device.type} (torch {torch.__version__}); use "
                                  f"impl='reference' there, or CUDA tensors")
    return flex_with_block_mask(q, k, v, flex_block_mask(layout), scale=scale,
                                return_lse=return_lse)


# ------------------------------------------------------------------ per-layout cache
_CACHE_SIZE = 8
_cache: "collections.OrderedDict" = collections.OrderedDict()
_cache_lock = threading.Lock()


def _layout_cached(kind, layout: PackedLayout, build: Callable):
    """A small LRU of objects derived from a layout (flex BlockMasks, xformers biases).
    Keyed by the layout itself (content hash, device-aware equality)."""
    key = (kind, layout)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    value = build()
    with _cache_lock:
        _cache[key] = value
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return value


def clear_layout_cache() -> None:
    """Drops every cached BlockMask / bias (tests, or to free device memory)."""
    with _cache_lock:
        _cache.clear()
