"""One loss call for a task-interleaved pack (DESIGN.md section 3.3).

The fused Triton path lands with issue #3; until then `impl="auto"` resolves to the
reference and `impl="triton"` raises NotImplementedError (see backends.py).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from unimrg_fast import backends
from unimrg_fast.specs import HeadSpec, JointLossOutput


def joint_loss(hidden: torch.Tensor, heads: Sequence[HeadSpec], num_tasks: int, *,
               task_weights: Optional[Union[torch.Tensor, Sequence[float]]] = None,
               impl: str = "auto") -> JointLossOutput:
    """Scores every head of a pack and reduces per task.

    Args:
        hidden: [T, H] final hidden states of the pack.
        heads: CEHeadSpec / RegressionHeadSpec, each naming its rows, targets and tasks.
        num_tasks: number of tasks; task ids lie in [0, num_tasks).
        task_weights: lambda_t, [num_tasks] (default all 1).

    Returns:
        JointLossOutput(total, task_loss_sum, task_weight_sum, task_rows), all tensors.
    """
    _, fn = backends.resolve("joint_loss", impl, device=hidden.device
                             if isinstance(hidden, torch.Tensor) else None)
    return fn(hidden, heads, num_tasks, task_weights=task_weights)
