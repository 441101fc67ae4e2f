"""Helpers shared by the Triton ops: how a kernel's dtypes change when it runs in the
Triton interpreter (TRITON_INTERPRET=1, the CPU lane; DESIGN.md section 4), and how
much shared memory a GPU gives one block (tile sizes must fit it)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, TypeVar

import torch

T = TypeVar("T")


def interpreted_bf16(dtype: torch.dtype, interpreted: bool) -> bool:
    """True where a kernel must not compute or round in bf16: the interpreter treats
    bf16 as raw bits (Triton issue 11584), so bf16 tiles are upcast right after loading.
    fp16 keeps its real dtype, so the CPU lane runs the GPU's casts."""
    return interpreted and dtype == torch.bfloat16


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy when its last dim is strided: the kernels' loads assume a
    unit stride there (a dim of size <= 1 has no stride to speak of)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., I] as [N, I] with unit column stride: a view where reshape gives one with
    unit column stride, else a contiguous copy (reshape never raises, so torch.compile
    traces it without an exception path)."""
    return unit_last(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]))


def check_kernel_device(x: torch.Tensor, name: str) -> None:
    """The Triton kernels run on CUDA tensors, or on CPU ones through the interpreter
    (TRITON_INTERPRET=1, set before unimrg_fast is imported); anything else is refused
    here, naming the argument, rather than failing inside a launch."""
    from unimrg_fast import backends   # backends imports the ops package

    if x.device.type == "cuda" or (x.device.type == "cpu" and backends.triton_interpreted()):
        return
    if x.device.type == "cpu":
        raise ValueError(f"{name} is on the CPU: the Triton kernels need CUDA tensors, or "
                         "TRITON_INTERPRET=1 set before importing unimrg_fast")
    raise ValueError(f"{name} must be a CUDA tensor for the Triton kernels, got {x.device}")


def store_dtype(dtype: torch.dtype, interpreted: bool) -> torch.dtype:
    """The dtype of a buffer a kernel writes for an output of `dtype`.

    The interpreter converts fp32 to bf16 by truncating the low mantissa bits, where a
    GPU rounds to nearest even: interpreted bf16 outputs are stored in fp32 and cast
    (with torch's rounding) outside the kernel.
    """
    return torch.float32 if interpreted_bf16(dtype, interpreted) else dtype


_sm_counts = {}  # device -> multiprocessor count; a dict that torch.compile can read


def multiprocessors(device: torch.device) -> int:
    """The multiprocessor (SM) count of a CUDA device, asked once; 1 elsewhere (grids
    sized by it then stay small on the interpreter)."""
    if device.type != "cuda":
        return 1
    if device not in _sm_counts:
        _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device]


# Shared memory per block (the opt-in maximum, `shared_memory_per_block_optin`) of the
# GPUs the kernels' tile ladders were sized for. Without a device to ask, an H100's.
SMEM_SM90 = 232448  # H100 / H200
SMEM_SM80 = 166912  # A100
SMEM_SM86 = 101376  # sm_86 / sm_89: A10, L4, L40, RTX 30xx / 40xx
SMEM_SM75 = 65536   # T4, RTX 20xx

_smem_limits = {}  # device -> shared memory per block; a dict that torch.compile can read


def smem_per_block(device: torch.device) -> Optional[int]:
    """The opt-in shared memory per block of a CUDA device; None elsewhere (the
    interpreter has no limit). A kernel whose tiles need more compiles fine and fails
    only at launch (OutOfResources), so tile choices are checked against this first."""
    if device.type != "cuda":
        return None
    if device not in _smem_limits:
        props = torch.cuda.get_device_properties(device)
        optin = getattr(props, "shared_memory_per_block_optin", None)
        _smem_limits[device] = int(optin) if optin else _smem_of_capability(
            props.major, props.minor)
    return _smem_limits[device]


def _smem_of_capability(major: int, minor: int) -> int:
    """The opt-in shared memory per block by compute capability, for a torch too old to
    report it (torch < 2.6). Never an H100's for a GPU not known to have it: too big a
    guess picks tiles that fail at launch, too small one only slower tiles."""
    if major < 8:
        return SMEM_SM75 if (major, minor) == (7, 5) else 98304 if major == 7 else 49152
    if (major, minor) in ((8, 0), (8, 7)):
        return SMEM_SM80
    if (major, minor) in ((9, 0), (10, 0)):
        return SMEM_SM90
    return SMEM_SM86   # sm_86 / sm_89 / sm_12x and anything unknown: the smallest of sm_8x+


def effective_limit(smem_limit: Optional[int]) -> int:
    """`smem_limit`, or an H100's where no device says (ladders are sized for it)."""
    return SMEM_SM90 if smem_limit is None else smem_limit


def smem_needed(entry: Tuple[T, int, int], smem_limit: Optional[int]) -> int:
    """The shared memory a ladder entry (tile config, bytes on sm_80 / sm_90, bytes on
    sm_75) needs on a GPU whose blocks get `smem_limit` bytes (None: an H100's).

    Triton compiles the same tiles to different sizes per architecture: sm_75 stages
    them without cp.async and needs up to 1.7x more. A limit of at most 64 KiB marks a
    pre-Ampere GPU (T4, RTX 20xx), so the limit picks the column. Both columns are
    measured by compiling offline (tests/test_kernel_resources.py checks them)."""
    return entry[2] if effective_limit(smem_limit) <= SMEM_SM75 else entry[1]


def first_that_fits(ladder: Sequence[Tuple[T, int, int]], smem_limit: Optional[int]
                    ) -> Optional[T]:
    """The tile config of the first (fastest) ladder entry that fits `smem_limit`; None
    when even the last does not."""
    for entry in ladder:
        if smem_needed(entry, smem_limit) <= effective_limit(smem_limit):
            return entry[0]
    return None
