"""Plain PyTorch joint loss of a task-interleaved pack (DESIGN.md section 3.3).

Written the way UMM codebases do it today: for each head, gather its rows, run the
reference loss with reduction="none" (materialising that head's logits), then scatter
the per-row losses into per-task sums with `index_add`. The loop runs over heads (a
handful per pack), never over tasks, and nothing synchronises with the host.

    hidden [T, H] ─rows─> head k ─> per-row w_i l_i ─index_add(task)─> task_loss_sum [num_tasks]
                                    per-row w_i     ─index_add(task)─> task_weight_sum
                                    per-row 1       ─index_add(task)─> task_rows
    total = sum_t lambda_t task_loss_sum_t / task_weight_sum_t   (0 for an empty task)
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from unimrg_fast._validation import FLOAT_DTYPES, check_index_range, check_tensor
from unimrg_fast.reference.cross_entropy import linear_cross_entropy
from unimrg_fast.reference.regression import regression_loss
from unimrg_fast.specs import (CEHeadSpec, HeadSpec, JointLossOutput, RegressionHeadSpec,
                               total_from_sums)


def _task_weights(task_weights, num_tasks: int, device: torch.device) -> torch.Tensor:
    if task_weights is None:
        return torch.ones(num_tasks, dtype=torch.float32, device=device)
    if not isinstance(task_weights, torch.Tensor):
        try:
            task_weights = torch.tensor([float(x) for x in task_weights], dtype=torch.float32,
                                        device=device)
        except (TypeError, ValueError) as exc:
            raise TypeError("task_weights must be None, a tensor or a sequence of floats "
                            f"(one per task), got {task_weights!r}") from exc
    check_tensor(task_weights, "task_weights", dtypes=FLOAT_DTYPES + (torch.float64,),
                 device=device)
    if tuple(task_weights.shape) != (num_tasks,):
        raise ValueError(f"task_weights must have shape [num_tasks] = ({num_tasks},), "
                         f"got {tuple(task_weights.shape)}")
    return task_weights


def _head_tasks(task, name: str, rows: int, num_tasks: int, device: torch.device) -> torch.Tensor:
    if isinstance(task, bool) or not isinstance(task, (int, torch.Tensor)):
        raise TypeError(f"{name} must be an int or an int64 tensor [R], got {type(task).__name__}")
    if isinstance(task, int):
        if not 0 <= task < num_tasks:
            raise ValueError(f"{name} must be in [0, num_tasks) = [0, {num_tasks}), got {task}")
        return torch.full((rows,), task, dtype=torch.int64, device=device)
    check_tensor(task, name, ndim=1, dtypes=(torch.int64,), device=device)
    if task.shape[0] != rows:
        raise ValueError(f"{name} must have shape [R] = ({rows},) (one task per row), "
                         f"got {tuple(task.shape)}")
    check_index_range(task, name, 0, num_tasks)
    return task


def joint_loss(hidden: torch.Tensor, heads: Sequence[HeadSpec], num_tasks: int, *,
               task_weights: Optional[Union[torch.Tensor, Sequence[float]]] = None
               ) -> JointLossOutput:
    """Scores every head of a pack and reduces per task (see score_heads)."""
    return score_heads(hidden, heads, num_tasks, task_weights=task_weights,
                       ce_fn=linear_cross_entropy, regression_fn=regression_loss)


def score_heads(hidden: torch.Tensor, heads: Sequence[HeadSpec], num_tasks: int, *,
                task_weights: Optional[Union[torch.Tensor, Sequence[float]]] = None,
                ce_fn: Callable[..., torch.Tensor],
                regression_fn: Callable[..., torch.Tensor]) -> JointLossOutput:
    """Scores every head of a pack with the given per-head losses and reduces per task.

    The reference passes its materialising losses, the fused path its Triton kernels:
    the per-task reduction (index_add, no host sync) is the same code for both.

    Args:
        hidden: [T, H] fp32 / fp16 / bf16 final hidden states of the pack.
        heads: a sequence of CEHeadSpec / RegressionHeadSpec; each names its rows
            ([R] int64 in [0, T)), targets ([R] int64 or [R, C]) and task ids ([R] int64
            or one int for every row, in [0, num_tasks)).
        num_tasks: number of tasks (>= 1).
        task_weights: lambda_t, [num_tasks] tensor or sequence (default all 1).

    Returns:
        JointLossOutput(total fp32 scalar, task_loss_sum fp32 [num_tasks],
        task_weight_sum fp32 [num_tasks], task_rows int64 [num_tasks]). Ignored CE rows
        count in neither sums nor rows.
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
    check_tensor(hidden, "hidden", ndim=2, dtypes=FLOAT_DTYPES)
    if isinstance(heads, (CEHeadSpec, RegressionHeadSpec)) or not isinstance(heads, Sequence):
        raise TypeError("heads must be a sequence (list / tuple) of CEHeadSpec / "
                        f"RegressionHeadSpec, got {type(heads).__name__}")
    device, num_rows = hidden.device, hidden.shape[0]
    lambdas = _task_weights(task_weights, num_tasks, device)

    loss_sum = torch.zeros(num_tasks, dtype=torch.float32, device=device)
    weight_sum = torch.zeros(num_tasks, dtype=torch.float32, device=device)
    row_count = torch.zeros(num_tasks, dtype=torch.int64, device=device)
    for k, head in enumerate(heads):
        name = f"heads[{k}]"
        if not isinstance(head, (CEHeadSpec, RegressionHeadSpec)):
            raise TypeError(f"{name} must be a CEHeadSpec or a RegressionHeadSpec, "
                            f"got {type(head).__name__}")
        check_tensor(head.rows, f"{name}.rows", ndim=1, dtypes=(torch.int64,), device=device)
        check_index_range(head.rows, f"{name}.rows", 0, num_rows)
        r = head.rows.shape[0]
        tasks = _head_tasks(head.task, f"{name}.task", r, num_tasks, device)
        h = hidden.index_select(0, head.rows)
        if isinstance(head, CEHeadSpec):
            check_tensor(head.target, f"{name}.target", ndim=1, dtypes=(torch.int64,),
                         device=device)
            if head.target.shape[0] != r:
                raise ValueError(f"{name}.target must have shape [R] = ({r},) (one class id "
                                 f"per row of {name}.rows), got {tuple(head.target.shape)}")
            valid = head.target != head.ignore_index
            call = lambda: ce_fn(  # noqa: E731
                h, head.weight, head.target, bias=head.bias, ignore_index=head.ignore_index,
                reduction="none", label_smoothing=head.label_smoothing, z_loss=head.z_loss,
                softcap=head.softcap, token_weight=head.token_weight)
        else:
            check_tensor(head.target, f"{name}.target", ndim=2, device=device)
            valid = None
            call = lambda: regression_fn(  # noqa: E731
                h, head.weight, head.target, bias=head.bias, token_weight=head.token_weight,
                reduction="none")
        try:
            per_row = call()  # [R] fp32: w_i l_i, 0 at ignored rows
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name} ({type(head).__name__}): {exc}") from exc

        w = (torch.ones(r, dtype=torch.float32, device=device) if head.token_weight is None
             else head.token_weight.reshape(r).to(torch.float32))
        if valid is not None:
            w = torch.where(valid, w, torch.zeros_like(w))
            counted = valid.to(torch.int64)
        else:
            counted = torch.ones(r, dtype=torch.int64, device=device)
        loss_sum = loss_sum.index_add(0, tasks, per_row)
        weight_sum = weight_sum.index_add(0, tasks, w)
        row_count = row_count.index_add(0, tasks, counted)

    total = total_from_sums(loss_sum, weight_sum, lambdas)
    return JointLossOutput(total, loss_sum, weight_sum, row_count)
