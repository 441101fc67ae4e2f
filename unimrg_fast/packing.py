"""Packing samples into packs of at most `max_tokens`, and the tile metadata of a pack.

Both run on the host, once per pack. Each function has two implementations with the same
signature and identical results: the C++ extension `unimrg_fast._native` (csrc/native.cpp)
and its numpy twin (unimrg_fast/_packing_numpy.py). `impl="auto"` takes the C++ one when it
was built (`pip install -e .`, or `python setup.py build_ext --inplace`); `NATIVE_AVAILABLE`
says whether it was. This module converts and checks arguments; errors name the argument.
"""
from __future__ import annotations

from typing import Any, Hashable, List, NamedTuple, Sequence

import numpy as np

from unimrg_fast import _packing_numpy
from unimrg_fast._packing_numpy import CAUSAL, FULL, NOISE, OVERFLOW, REJECTED

try:
    from unimrg_fast import _native
except ImportError:  # not built: the numpy twins compute the same results, more slowly
    _native = None

NATIVE_AVAILABLE: bool = _native is not None
IMPLS = ("auto", "native", "numpy")

__all__ = ["NATIVE_AVAILABLE", "CAUSAL", "FULL", "NOISE", "OVERFLOW", "REJECTED", "TileArrays",
           "pack_first_fit_decreasing", "tile_metadata", "StreamingPacker"]

_INT32 = np.iinfo(np.int32)
_INT64 = np.iinfo(np.int64)


def _backend(impl: str):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if impl == "numpy" or (impl == "auto" and _native is None):
        return _packing_numpy
    if _native is None:
        raise RuntimeError("impl='native' needs the C++ extension unimrg_fast._native, which is not "
                           "built; build it with `pip install -e .` (needs a C++17 compiler and "
                           "pybind11) or use impl='numpy'")
    return _native


def _int(value: Any, name: str, minimum: int = _INT64.min) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not minimum <= value <= _INT64.max:
        raise ValueError(f"{name} must be in [{minimum}, 2**63 - 1], got {value}")
    return int(value)


def _int_vector(values: Any, name: str, dtype) -> np.ndarray:
    """A contiguous 1-D array of `dtype` (int64 or int32) from any integer sequence."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:  # np.asarray([]) is float64; an empty list is still fine
        return np.zeros(0, dtype)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.dtype != dtype:
        info = np.iinfo(dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise ValueError(f"{name} must fit in {np.dtype(dtype).name}, got values in [{low}, {high}]")
    return np.ascontiguousarray(array, dtype=dtype)


# ----------------------------------------------------------------------------- packing
def pack_first_fit_decreasing(lengths: Sequence[int] | np.ndarray, max_tokens: int,
                              max_packs: int = 0, *, impl: str = "auto") -> np.ndarray:
    """Assigns samples to packs of at most `max_tokens` tokens, first-fit decreasing.

    Samples are placed longest first (ties: lower index first), each into the lowest-numbered
    open pack with room for it, opening a new pack when none has room. Packs are numbered in
    the order they open.

    Args:
        lengths: [n] sample lengths in tokens, each >= 1.
        max_tokens: capacity of a pack, >= 1.
        max_packs: at most this many packs are opened; <= 0 means unlimited.
        impl: "auto" (C++ when built), "native" or "numpy".

    Returns:
        int64 [n]: the pack of each sample, or OVERFLOW (-1) when it would fit a new pack but
        `max_packs` are already open (keep it for the next call; never with max_packs <= 0),
        or REJECTED (-2) when it is longer than `max_tokens` (it can never be packed).
    """
    backend = _backend(impl)
    lengths = _int_vector(lengths, "lengths", np.int64)
    max_tokens = _int(max_tokens, "max_tokens", minimum=1)
    max_packs = _int(max_packs, "max_packs")
    return backend.pack_first_fit_decreasing(lengths, max_tokens, max_packs)


class StreamingPacker:
    """Packs a stream of samples into packs of at most `max_tokens` tokens, losing none.

        packer = StreamingPacker(max_tokens=32768, max_packs=8)
        packer.add(["a", "b", "c"], [1500, 31000, 40000])
        packer.pop_packs()   # [["b"], ["a"]]: lists of sample ids, at most max_packs
        packer.rejected      # ["c"]: longer than max_tokens, never packed

    Samples that did not fit in the `max_packs` packs of a pop stay buffered (`pending`) and
    come first, ahead of samples added later, in the next pop. Every added id leaves exactly
    once: in a pack, or in `rejected` (at `add`, since it can never fit).
    """

    def __init__(self, max_tokens: int, max_packs: int = 0, *, impl: str = "auto"):
        self.max_tokens = _int(max_tokens, "max_tokens", minimum=1)
        self.max_packs = _int(max_packs, "max_packs")
        _backend(impl)  # fail now, not at the first pop
        self.impl = impl
        self.rejected: List[Hashable] = []
        self._ids: List[Hashable] = []
        self._lengths: List[int] = []

    @property
    def pending(self) -> int:
        """Samples buffered for the next pop_packs()."""
        return len(self._ids)

    def state_dict(self) -> dict:
        """The buffer and the rejected ids (a resumable trainer checkpoints them): a packer
        given it by load_state_dict pops exactly what this one would."""
        return {"ids": list(self._ids), "lengths": list(self._lengths),
                "rejected": list(self.rejected)}

    def load_state_dict(self, state: dict) -> None:
        """Restores state_dict() (all or nothing on error). The buffer goes through add's
        rules: a state saved by a packer with a larger max_tokens rejects the samples
        that no longer fit, instead of keeping them pending forever."""
        if len(state["ids"]) != len(state["lengths"]):
            raise ValueError(f"state's ids and lengths must have the same length, got "
                             f"{len(state['ids'])} and {len(state['lengths'])}")
        fresh = StreamingPacker(self.max_tokens, self.max_packs, impl=self.impl)
        fresh.rejected = list(state["rejected"])
        fresh.add(state["ids"], state["lengths"])
        self._ids, self._lengths, self.rejected = fresh._ids, fresh._lengths, fresh.rejected

    def add(self, sample_ids: Sequence[Hashable], lengths: Sequence[int] | np.ndarray) -> None:
        """Buffers samples (ids of any kind, lengths >= 1); all or none of them on error."""
        ids = list(sample_ids)
        lengths = _int_vector(lengths, "lengths", np.int64)
        if len(ids) != lengths.shape[0]:
            raise ValueError(f"sample_ids and lengths must have the same length, got "
                             f"{len(ids)} and {lengths.shape[0]}")
        bad = np.flatnonzero(lengths < 1)
        if bad.size:
            raise ValueError(f"lengths[{bad[0]}] must be >= 1, got {lengths[bad[0]]}")
        for sample_id, length in zip(ids, lengths.tolist()):
            if length > self.max_tokens:
                self.rejected.append(sample_id)
            else:
                self._ids.append(sample_id)
                self._lengths.append(length)

    def pop_packs(self) -> List[List[Hashable]]:
        """Packs the buffer; returns the packs' ids (each pack in buffer order)."""
        if not self._ids:
            return []
        assignment = pack_first_fit_decreasing(self._lengths, self.max_tokens, self.max_packs,
                                               impl=self.impl).tolist()
        packs: List[List[Hashable]] = [[] for _ in range(max(assignment) + 1)]
        kept_ids, kept_lengths = [], []
        for sample_id, length, pack in zip(self._ids, self._lengths, assignment):
            if pack >= 0:
                packs[pack].append(sample_id)
            else:  # OVERFLOW: REJECTED samples never enter the buffer
                kept_ids.append(sample_id)
                kept_lengths.append(length)
        self._ids, self._lengths = kept_ids, kept_lengths
        return packs


# ------------------------------------------------------------------------ tile metadata
class TileArrays(NamedTuple):
    """Block-sparse structure of a pack's attention mask for one tile size (host, int32)."""

    q_tile_ptr: np.ndarray   # [nQ + 1] row pointers of the forward CSR
    k_tile_idx: np.ndarray   # [nnz] key tiles of each query tile, ascending
    k_tile_full: np.ndarray  # [nnz] 1: every pair visible and both tiles in bounds
    k_tile_ptr: np.ndarray   # [nK + 1] row pointers of the transpose (backward dk / dv)
    q_tile_idx: np.ndarray   # [nnz] query tiles of each key tile, ascending
    q_tile_full: np.ndarray  # [nnz] the same flags as k_tile_full, transposed


def tile_metadata(cu_seqlens, span_bounds, span_modes, span_sample, block_q: int, block_k: int,
                  *, impl: str = "auto") -> TileArrays:
    """Which key tiles each query tile must visit under the rule of DESIGN.md 3.4, and which
    of them need no per-element mask.

    A pack of T tokens is cut into nQ = ceil(T / block_q) query tiles and nK = ceil(T / block_k)
    key tiles. Two samples, [full 3 | causal 2] and [causal 2 | noise 3], tiles 2 x 2
    (x: q may attend k; F: full tile, P: partial tile, needs the mask, .: not visited)::

                       keys 0 1 2 3 4 5 6 7 8 9           k0 k1 k2 k3 k4
        sample 0 full   q 0 x x x . . . . . . .       q0   F  P  .  .  .
                        q 1 x x x . . . . . . .
                        q 2 x x x . . . . . . .       q1   F  P  .  .  .
               causal   q 3 x x x x . . . . . .
                        q 4 x x x x x . . . . .       q2   P  P  P  .  .
        sample 1 causal q 5 . . . . . x . . . .
                        q 6 . . . . . x x . . .       q3   .  .  P  P  P
                 noise  q 7 . . . . . x x x x x
                        q 8 . . . . . x x x x x       q4   .  .  P  F  F
                        q 9 . . . . . x x x x x

    Args:
        cu_seqlens: int32 [S+1] sample boundaries, 0 first, strictly increasing.
        span_bounds: int32 [P+1] span boundaries (span p is tokens [span_bounds[p],
            span_bounds[p+1])), 0 first, strictly increasing, last == cu_seqlens[-1] == T.
        span_modes: int32 [P] 0 causal, 1 full, 2 noise.
        span_sample: int32 [P] sample of each span: 0 first, steps of 0 or 1, S-1 last, and
            each sample's first span starts at its cu_seqlens entry.
        block_q, block_k: tile sizes, >= 1.
        impl: "auto" (C++ when built), "native" or "numpy".

    Returns:
        TileArrays(q_tile_ptr [nQ+1], k_tile_idx [nnz], k_tile_full [nnz], k_tile_ptr [nK+1],
        q_tile_idx [nnz], q_tile_full [nnz]), all int32. Query tile i visits key tiles
        k_tile_idx[q_tile_ptr[i]:q_tile_ptr[i+1]]: those with at least one visible pair.
        A tile is full when every (q, k) of its rectangle is visible and both tiles lie
        inside [0, T), so a kernel may skip masking and bounds checks.
    """
    backend = _backend(impl)
    arrays = (_int_vector(cu_seqlens, "cu_seqlens", np.int32),
              _int_vector(span_bounds, "span_bounds", np.int32),
              _int_vector(span_modes, "span_modes", np.int32),
              _int_vector(span_sample, "span_sample", np.int32))
    block_q = _int(block_q, "block_q", minimum=1)
    block_k = _int(block_k, "block_k", minimum=1)
    return TileArrays(*backend.tile_metadata(*arrays, block_q, block_k))
