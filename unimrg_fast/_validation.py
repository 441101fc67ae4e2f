"""Argument checks shared by every op and its reference twin.

Every check raises an error that names the argument and what was expected, so a bad
call fails at the boundary instead of deep inside a kernel. None of them synchronises
with a GPU: value checks (index ranges) run only where they are free (CPU tensors) or
when UNIMRG_FAST_DEBUG=1 asks for them.
"""
from __future__ import annotations

import operator
import os
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64", torch.int64: "int64", torch.int32: "int32"}


def _dtype_list(dtypes: Iterable[torch.dtype]) -> str:
    return " / ".join(_DTYPE_NAMES.get(d, str(d)) for d in dtypes)


def check_out_dtype(out_dtype, default: torch.dtype, dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """An op's output dtype: `out_dtype`, or `default` (what eager promotion of the inputs
    gives) when it is None; anything but one of `dtypes` is a TypeError."""
    if out_dtype is None:
        return default
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in dtypes:
        raise TypeError(f"out_dtype must be None (the inputs' promoted dtype) or "
                        f"{_dtype_list(dtypes)}, got {out_dtype!r}")
    return out_dtype


def check_tensor(x, name: str, *, ndim: Optional[int] = None,
                 dtypes: Optional[Sequence[torch.dtype]] = None,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """Checks that `x` is a tensor of the given rank, dtype family and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_list(dtypes)}, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {x.device}")
    return x


def check_shape(x: torch.Tensor, name: str, expected: Sequence[int], what: str) -> None:
    """Checks an exact shape; `what` explains where the expected sizes come from."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(x.shape)}")


def debug_checks_enabled() -> bool:
    return os.environ.get("UNIMRG_FAST_DEBUG", "0") not in ("", "0", "false", "False")


def _values_checkable(x: torch.Tensor) -> bool:
    """Whether a check may read x's values: on a CPU tensor it is free; on a CUDA one it
    would sync, so only in debug mode; never on a tensor without data (meta) or while
    torch.compile traces (a value check would break the graph)."""
    if x.numel() == 0 or x.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return not x.is_cuda or debug_checks_enabled()


def check_index_range(x: torch.Tensor, name: str, low: int, high: int,
                      allowed_extra: Optional[int] = None) -> None:
    """Checks low <= x < high (x == allowed_extra is also accepted, e.g. ignore_index).

    Runs on CPU tensors, where it costs no synchronisation, and on GPU tensors only in
    debug mode; on a GPU the kernels poison bad rows with NaN instead of reading
    out of bounds, so a bad index is never a silent wrong answer. Skipped while
    torch.compile traces (a value check would break the graph); the poison still holds.
    """
    if not _values_checkable(x):
        return
    bad = (x < low) | (x >= high)
    if allowed_extra is not None:
        bad &= x != allowed_extra
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0]) if x.dim() == 1 else tuple(bad.nonzero()[0].tolist())
        extra = f" or {allowed_extra}" if allowed_extra is not None else ""
        raise ValueError(f"{name} must hold values in [{low}, {high}){extra}; "
                         f"found {x.flatten()[bad.flatten()][0].item()} at index {pos}")


def check_sizes(**sizes) -> None:
    """Each keyword must be an int >= 1 (a bool is not a size): e.g. a head's widths."""
    for name, value in sizes.items():
        try:
            ok = not isinstance(value, bool) and operator.index(value) >= 1
        except TypeError:   # a float, a string, None: not an integer at all
            ok = False
        if not ok:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def flatten_rows(hidden: torch.Tensor, name: str = "hidden") -> torch.Tensor:
    """[..., H] -> [N, H]; leading dimensions are flattened as DESIGN.md 3.1 says."""
    if hidden.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension [..., H], got a scalar")
    return hidden.reshape(-1, hidden.shape[-1]) if hidden.dim() != 2 else hidden


def check_linear_head(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      out_name: str) -> None:
    """Common checks for a fused linear head: hidden [N, H], weight [O, H], bias [O]."""
    check_tensor(hidden, "hidden", ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(weight, "weight", ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape [{out_name}, H] with H = hidden.shape[-1] = "
                         f"{hidden.shape[1]}, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have at least one output row ({out_name} >= 1)")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtypes=FLOAT_DTYPES, device=hidden.device)
        check_shape(bias, "bias", (weight.shape[0],), f"[{out_name}] = weight.shape[0]")


def check_token_weight(token_weight: Optional[torch.Tensor], n: int, device: torch.device) -> None:
    if token_weight is None:
        return
    check_tensor(token_weight, "token_weight", dtypes=FLOAT_DTYPES + (torch.float64,), device=device)
    if token_weight.numel() != n:
        raise ValueError(f"token_weight must have one weight per row ({n} rows), "
                         f"got shape {tuple(token_weight.shape)}")
    # A negative weight turns a "mean" into a ratio of signed sums (0 / 0 -> 0 when they
    # cancel): never what a caller meant. Checked where check_index_range checks (free on
    # CPU tensors, on GPU in debug mode). NaN / inf pass: on an ignored row they are a
    # legitimate 1 / #labels of a sample with no labels, and contribute nothing.
    if not _values_checkable(token_weight):
        return
    negative = token_weight.reshape(-1) < 0
    if bool(negative.any()):
        pos = int(negative.nonzero()[0, 0])
        raise ValueError(f"token_weight must be >= 0; found {token_weight.reshape(-1)[pos].item()} "
                         f"at row {pos}")
