"""One loss call for a task-interleaved pack (DESIGN.md section 3.3).

    hidden [T, H] ─rows─> CE head (fused linear CE, no logits) ─┐
                  ─rows─> regression head (fused linear + MSE) ─┼─ index_add per task ─> total
                  ─rows─> ...                                   ─┘

The fused path ("triton") runs each head's Triton kernel with reduction="none" and
shares the per-task reduction with the reference (reference.joint.score_heads): one
loop over the pack's few heads, never over tasks, and no host synchronisation, so
per-task sums and counts stay on the device for a distributed trainer to all-reduce.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from unimrg_fast import backends
from unimrg_fast.ops._common import check_kernel_device
from unimrg_fast.ops.linear_cross_entropy import _triton as _linear_cross_entropy_triton
from unimrg_fast.ops.regression_loss import _triton as _regression_loss_triton
from unimrg_fast.reference.joint import score_heads
from unimrg_fast.specs import HeadSpec, JointLossOutput


def _triton(hidden: torch.Tensor, heads: Sequence[HeadSpec], num_tasks: int, *,
            task_weights: Optional[Union[torch.Tensor, Sequence[float]]] = None
            ) -> JointLossOutput:
    if isinstance(hidden, torch.Tensor):
        check_kernel_device(hidden, "hidden")
    return score_heads(hidden, heads, num_tasks, task_weights=task_weights,
                       ce_fn=_linear_cross_entropy_triton,
                       regression_fn=_regression_loss_triton)


def joint_loss(hidden: torch.Tensor, heads: Sequence[HeadSpec], num_tasks: int, *,
               task_weights: Optional[Union[torch.Tensor, Sequence[float]]] = None,
               impl: str = "auto") -> JointLossOutput:
    """Scores every head of a pack and reduces per task.

    Args:
        hidden: [T, H] final hidden states of the pack (fp32 / fp16 / bf16).
        heads: CEHeadSpec / RegressionHeadSpec (unimrg_fast.specs), each naming its rows
            ([R] int64 in [0, T)), targets ([R] int64 or [R, C]) and task ids ([R] int64
            or one int).
        num_tasks: number of tasks; task ids lie in [0, num_tasks).
        task_weights: lambda_t, [num_tasks] (default all 1). Pass a device tensor on a
            GPU: a Python list is copied to the device on every call.

    Returns:
        JointLossOutput(total, task_loss_sum, task_weight_sum, task_rows), all tensors:
        total = sum_t lambda_t task_loss_sum_t / task_weight_sum_t, 0 for a task with no
        rows in the pack (no NaN).
    """
    _, fn = backends.resolve("joint_loss", impl, device=hidden.device
                             if isinstance(hidden, torch.Tensor) else None,
                             tensors=(hidden, *(getattr(h, name, None) for h in heads
                                                for name in ("weight", "bias", "target"))))
    return fn(hidden, heads, num_tasks, task_weights=task_weights)
