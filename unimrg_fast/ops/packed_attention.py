"""Task-interleaved packed attention (DESIGN.md sections 3.4 and 3.5).

The Triton kernels land with issue #4; until then `impl="auto"` resolves to the
reference and `impl="triton"` raises NotImplementedError (see backends.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from unimrg_fast import backends
from unimrg_fast.layout import PackedLayout


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, *,
                     scale: Optional[float] = None, impl: str = "auto", return_lse: bool = False,
                     deterministic: bool = False):
    """Softmax attention over a pack of samples under the rule of DESIGN.md 3.4.

    Args:
        q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq a multiple of Hkv (MHA, GQA, MQA).
        layout: the pack's PackedLayout (T tokens), on the same device.
        scale: softmax scale, default D ** -0.5.
        return_lse: also return the log-sum-exp [Hq, T] in fp32.
        deterministic: ask for a deterministic backward.

    Returns:
        out [T, Hq, D] (dtype of q), or (out, lse) when return_lse.

    Mask of one sample [image (full) | text (causal) | target (noise)], 1 = visible::

        q\\k  I I T T N N
        I    1 1 . . . .
        I    1 1 . . . .
        T    1 1 1 . . .
        T    1 1 1 1 . .
        N    1 1 1 1 1 1
        N    1 1 1 1 1 1
    """
    _, fn = backends.resolve("packed_attention", impl, device=q.device
                             if isinstance(q, torch.Tensor) else None, layout=layout)
    return fn(q, k, v, layout, scale=scale, return_lse=return_lse, deterministic=deterministic)
