"""The inputs and output of `joint_loss` (DESIGN.md section 3.3), shared by every impl.

A pack's hidden states [T, H] are scored by several heads. Each head says which rows
of the pack it scores, their targets and their task ids:

    hidden [T, H] ──rows──> CEHeadSpec(weight [V, H], target [R] int64)      -> CE per row
                  ──rows──> RegressionHeadSpec(weight [C, H], target [R, C]) -> MSE per row

Per task t: L_t = sum_rows w_i l_i / sum_rows w_i (0 when the task has no rows in the
pack), total = sum_t lambda_t L_t.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Union

import torch


@dataclasses.dataclass(frozen=True)
class CEHeadSpec:
    """A cross-entropy head (text LM head, or an AR model's image-codebook head)."""

    weight: torch.Tensor
    """[V, H] output projection."""
    rows: torch.Tensor
    """[R] int64 indices into the pack's T rows that this head scores."""
    target: torch.Tensor
    """[R] int64 class ids; `ignore_index` rows contribute nothing."""
    task: Union[torch.Tensor, int]
    """[R] int64 task id of each row, or one int for all rows of this head."""
    bias: Optional[torch.Tensor] = None
    """[V] or None."""
    token_weight: Optional[torch.Tensor] = None
    """[R] non-negative per-row weights, or None for 1."""
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class RegressionHeadSpec:
    """A linear regression head H -> C scored by mean squared error per row (MSE on
    latents, DDPM epsilon-prediction, flow matching: the caller builds the target)."""

    weight: torch.Tensor
    """[C, H] output projection."""
    rows: torch.Tensor
    """[R] int64 indices into the pack's T rows that this head scores."""
    target: torch.Tensor
    """[R, C] regression targets."""
    task: Union[torch.Tensor, int]
    """[R] int64 task id of each row, or one int for all rows of this head."""
    bias: Optional[torch.Tensor] = None
    """[C] or None."""
    token_weight: Optional[torch.Tensor] = None
    """[R] non-negative per-row weights (e.g. a timestep weighting), or None for 1."""


HeadSpec = Union[CEHeadSpec, RegressionHeadSpec]


class JointLossOutput(NamedTuple):
    """What `joint_loss` returns; every field is a tensor, so nothing syncs the host.

    A distributed trainer all-reduces `task_loss_sum` and `task_weight_sum` and
    recomputes the total from global sums (see `total_from_sums`).
    """

    total: torch.Tensor
    """Scalar fp32: sum_t lambda_t * task_loss_sum[t] / task_weight_sum[t]."""
    task_loss_sum: torch.Tensor
    """[num_tasks] fp32: sum of w_i * l_i over the task's scored rows."""
    task_weight_sum: torch.Tensor
    """[num_tasks] fp32: sum of w_i over the task's scored rows (the row count when w = 1)."""
    task_rows: torch.Tensor
    """[num_tasks] int64: number of scored (non-ignored) rows of each task."""


def total_from_sums(task_loss_sum: torch.Tensor, task_weight_sum: torch.Tensor,
                    task_weights: torch.Tensor) -> torch.Tensor:
    """sum_t lambda_t * loss_sum_t / weight_sum_t, with 0 (and zero gradient, no NaN)
    for tasks whose weight sum is exactly 0; a NaN weight sum (a NaN weight on a scored
    row) keeps the total NaN, as its gradients are."""
    empty = task_weight_sum == 0
    safe = torch.where(empty, torch.ones_like(task_weight_sum), task_weight_sum)
    per_task = torch.where(empty, torch.zeros_like(task_loss_sum), task_loss_sum / safe)
    return (task_weights.to(per_task.dtype) * per_task).sum()
