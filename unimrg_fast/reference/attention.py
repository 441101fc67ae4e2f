"""Reference packed attention: per-sample dense masks through torch SDPA.

This is how unified-multimodal-model codebases compute task-interleaved attention
today when FlexAttention is not used (DESIGN.md section 3.5): loop over the samples
of the pack, build each sample's [L, L] boolean mask from the rule of section 3.4,
call `scaled_dot_product_attention`, concatenate. It is the correctness baseline of
the Triton kernel and the "plain" side of its benchmarks.

Sample bounds come from the layout's host copy (`layout.seqlens`), never from its
device tensors, so the loop itself does not synchronise with the GPU. The masks are
built once per layout (`layout.sample_masks()`, cached on the layout's device) and
shared by every layer, as a training loop that builds its masks per batch would.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from unimrg_fast._validation import FLOAT_DTYPES, check_tensor
from unimrg_fast.layout import PackedLayout


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, *,
                     scale: Optional[float] = None, return_lse: bool = False,
                     deterministic: bool = False):
    """Softmax attention over a pack under the rule of DESIGN.md 3.4, one sample at a time.

    Args:
        q: [T, Hq, D] float32 / float16 / bfloat16.
        k, v: [T, Hkv, D], same dtype and device as q; Hq a multiple of Hkv
            (MHA Hkv == Hq, GQA, MQA Hkv == 1). Query head h reads key/value head
            h // (Hq // Hkv), as in FlashAttention.
        layout: the pack's PackedLayout with T tokens, on q's device.
        scale: softmax scale > 0, default D ** -0.5.
        return_lse: also return lse [Hq, T] float32, log sum_k exp(scale * q.k) over the
            visible keys, computed explicitly from the masked fp32 scores (it is
            differentiable here, unlike a kernel's saved statistics).
        deterministic: on CUDA, restricts SDPA to its math backend, whose backward is
            plain matmuls (the memory-efficient backend, which takes masks, is not
            deterministic by default). On CPU the reference is deterministic either way.
            Under torch.func transforms and forward-mode AD the math backend is used too.

    Returns:
        out [T, Hq, D] in q's dtype, or (out, lse) when return_lse.

    Per sample s of length L (tokens [cu_seqlens[s], cu_seqlens[s+1]))::

        q_s [L, Hq, D] -> [1, Hq, L, D]     k_s, v_s [L, Hkv, D] -> [1, Hq, L, D]
        out_s = SDPA(q_s, k_s, v_s, attn_mask=layout.sample_masks()[s])   # [L, L] bool
    """
    _check_inputs(q, k, v, layout, scale)
    head_dim = q.shape[2]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    group = q.shape[1] // k.shape[1]

    # SDPA's fused backends have no forward-mode derivative (torch.func.jvp raises); its
    # math backend, plain matmuls, has
    from unimrg_fast.backends import derivative_transform

    math_only = (deterministic and q.is_cuda) or derivative_transform((q, k, v)) is not None
    with sdpa_kernel(SDPBackend.MATH) if math_only else contextlib.nullcontext():
        out, lse = _per_sample(q, k, v, layout, scale, group, return_lse)
    return (out, lse) if return_lse else out


def _per_sample(q, k, v, layout, scale, group, return_lse):
    outs, lses = [], []
    masks = layout.sample_masks()                              # built once per layout
    start = 0
    for sample, length in enumerate(layout.seqlens):
        end = start + length
        mask = masks[sample]                                   # [L, L] bool on layout.device
        qs = q[start:end].transpose(0, 1)                      # [Hq, L, D]
        ks = k[start:end].transpose(0, 1)                      # [Hkv, L, D]
        vs = v[start:end].transpose(0, 1)
        if group > 1:
            ks = ks.repeat_interleave(group, dim=0)            # [Hq, L, D]
            vs = vs.repeat_interleave(group, dim=0)
        out = F.scaled_dot_product_attention(qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
                                             attn_mask=mask, scale=scale)
        outs.append(out[0].transpose(0, 1))                    # [L, Hq, D]
        if return_lse:
            # fp32 scores of the operands SDPA multiplied (autocast's dtype, under autocast):
            # with autocast on, the matmul would cast the fp32 copies back down, giving a
            # 16-bit lse where the contract (and the kernel) give fp32
            no_autocast = (torch.autocast(q.device.type, enabled=False)
                           if torch.amp.is_autocast_available(q.device.type)
                           else contextlib.nullcontext())   # e.g. meta tensors
            with no_autocast:
                qf, kf = qs.to(out.dtype).float(), ks.to(out.dtype).float()
                scores = torch.matmul(qf, kf.transpose(1, 2)) * scale   # [Hq, L, L]
                scores = scores.masked_fill(~mask, float("-inf"))
                lses.append(torch.logsumexp(scores, dim=-1))   # [Hq, L]
        start = end

    out = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0].contiguous()
    return out, (torch.cat(lses, dim=1) if return_lse else None)


def _check_inputs(q, k, v, layout, scale) -> None:
    if not isinstance(layout, PackedLayout):
        raise TypeError(f"layout must be a PackedLayout (PackedLayout.from_spans(...)), "
                        f"got {type(layout).__name__}")
    check_tensor(q, "q", ndim=3, dtypes=FLOAT_DTYPES)
    for name, x in (("k", k), ("v", v)):
        check_tensor(x, name, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}; "
                         f"use layout.to(q.device)")
    layout.check_num_tokens(q.shape[0], "q")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape [T, Hkv, D], got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    layout.check_num_tokens(k.shape[0], "k")
    num_q_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    if num_q_heads < 1 or num_kv_heads < 1 or head_dim < 1:
        raise ValueError(f"q and k need at least one head and head dim >= 1, got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    if k.shape[2] != head_dim:
        raise ValueError(f"k and v must have q's head dim D = {head_dim}, got k {tuple(k.shape)}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q's head count ({num_q_heads}) must be a multiple of k's and v's "
                         f"({num_kv_heads}) for MHA / GQA / MQA")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale}")
