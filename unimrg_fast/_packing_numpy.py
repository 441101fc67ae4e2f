"""Numpy twins of the C++ helpers in csrc/native.cpp: same signatures, identical results.

They are the fallback when the extension is not built, and the second opinion the tests
compare the C++ against. Use them through unimrg_fast.packing, which converts inputs to
the exact dtypes expected here (int64 lengths, int32 layout arrays). Like the C++, they
re-check every value they rely on and raise the same ValueError messages.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

CAUSAL, FULL, NOISE = 0, 1, 2
OVERFLOW = -1  # fits a pack, but max_packs were already open: retry in a later call
REJECTED = -2  # longer than max_tokens: can never be packed

_INT32_MAX = 2 ** 31 - 1


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _vector(array: np.ndarray, name: str) -> np.ndarray:
    _require(array.ndim == 1, f"{name} must be 1-D, got {array.ndim} dimensions")
    return array


# ----------------------------------------------------------------------------- packing
def pack_first_fit_decreasing(lengths: np.ndarray, max_tokens: int, max_packs: int = 0) -> np.ndarray:
    """int64[n] pack index per sample; OVERFLOW (-1) or REJECTED (-2) where none is given."""
    lengths = _vector(lengths, "lengths")
    _require(max_tokens >= 1, f"max_tokens must be >= 1, got {max_tokens}")
    bad = np.flatnonzero(lengths < 1)
    if bad.size:
        raise ValueError(f"lengths[{bad[0]}] must be >= 1, got {lengths[bad[0]]}")
    n = lengths.shape[0]
    assignment = np.full(n, REJECTED, dtype=np.int64)
    num_fitting = int(np.count_nonzero(lengths <= max_tokens))
    remaining = np.empty(min(max_packs, num_fitting) if max_packs > 0 else num_fitting, np.int64)
    opened = 0
    # Descending length, ties by original index: a stable sort of the negated lengths.
    for i in np.argsort(-lengths, kind="stable"):
        length = lengths[i]
        if length > max_tokens:
            continue
        fits = remaining[:opened] >= length
        pack = int(np.argmax(fits)) if opened else 0
        if opened == 0 or not fits[pack]:
            if opened == remaining.shape[0]:
                assignment[i] = OVERFLOW
                continue
            pack = opened
            remaining[pack] = max_tokens
            opened += 1
        remaining[pack] -= length
        assignment[i] = pack
    return assignment


# ----------------------------------------------------------------------- tile metadata
def _check_offsets(offsets: np.ndarray, name: str, unit: str) -> None:
    """check_offsets() in native.cpp: offsets[0] == 0 and strictly increasing (every
    `unit` holds at least one token), with the same messages."""
    _require(offsets[0] == 0, f"{name}[0] must be 0, got {offsets[0]}")
    bad = np.flatnonzero(np.diff(offsets) <= 0)
    if bad.size:
        i = bad[0]
        raise ValueError(f"{name} must be strictly increasing (every {unit} >= 1 token); "
                         f"{name}[{i + 1}] = {offsets[i + 1]} <= {name}[{i}] = {offsets[i]}")


def _check_layout(cu: np.ndarray, bounds: np.ndarray, modes: np.ndarray,
                  span_sample: np.ndarray) -> None:
    """The checks of check_layout() in native.cpp, in the same order with the same messages."""
    num_samples, num_spans = cu.shape[0] - 1, bounds.shape[0] - 1
    _check_offsets(cu, "cu_seqlens", "sample")
    _check_offsets(bounds, "span_bounds", "span")
    _require(bounds[-1] == cu[-1], f"span_bounds[-1] = {bounds[-1]} must equal cu_seqlens[-1] = "
                                   f"{cu[-1]} (both are the pack's token count)")
    bad = np.flatnonzero((modes < 0) | (modes > 2))
    if bad.size:
        raise ValueError(f"span_modes[{bad[0]}] must be 0 (causal), 1 (full) or 2 (noise), "
                         f"got {modes[bad[0]]}")
    previous = np.concatenate([[-1], span_sample[:-1]]).astype(np.int64)
    step = span_sample - previous
    ok_step = (step == 0) | (step == 1)
    if num_spans:
        ok_step[0] = span_sample[0] == 0
    # The C++ checks each span in turn: the step, then the range, then the start.
    ok_range = span_sample < num_samples
    starts_sample = step != 0
    ok_start = np.ones(num_spans, dtype=bool)
    checkable = ok_step & ok_range & starts_sample & (span_sample >= 0)
    ok_start[checkable] = bounds[:-1][checkable] == cu[span_sample[checkable]]
    bad = np.flatnonzero(~(ok_step & ok_range & ok_start))
    if bad.size:
        p = bad[0]
        if not ok_step[p]:
            raise ValueError("span_sample must start at 0 and step by 0 or 1 (every sample has "
                             f">= 1 span); span_sample[{p}] = {span_sample[p]}")
        if not ok_range[p]:
            raise ValueError(f"span_sample[{p}] = {span_sample[p]} is not a sample index "
                             f"(cu_seqlens holds {num_samples})")
        raise ValueError(f"span_sample is inconsistent with cu_seqlens: span {p} starts sample "
                         f"{span_sample[p]} at token {bounds[p]} but cu_seqlens says "
                         f"{cu[span_sample[p]]}")
    last = int(span_sample[-1]) if num_spans else -1
    _require(num_spans == 0 or last == num_samples - 1,
             f"span_sample must end at the last sample {num_samples - 1}, got {last}")


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(x)[:-1]]).astype(np.int64)


def tile_metadata(cu_seqlens: np.ndarray, span_bounds: np.ndarray, span_modes: np.ndarray,
                  span_sample: np.ndarray, block_q: int, block_k: int) -> Tuple[np.ndarray, ...]:
    """(q_tile_ptr, k_tile_idx, k_tile_full, k_tile_ptr, q_tile_idx, q_tile_full), int32.

    The algorithm of tile_metadata() in native.cpp, vectorised: every (segment, candidate
    key tile) pair is tested at once, then pairs are reduced per (query tile, key tile).
    A segment is the part of a query tile inside one span.
    """
    cu = _vector(cu_seqlens, "cu_seqlens")
    bounds = _vector(span_bounds, "span_bounds")
    modes = _vector(span_modes, "span_modes")
    span_sample = _vector(span_sample, "span_sample")
    _require(cu.shape[0] >= 1, "cu_seqlens must hold at least one entry (S + 1 with S >= 0)")
    _require(bounds.shape[0] >= 1, "span_bounds must hold at least one entry (P + 1 with P >= 0)")
    num_spans = bounds.shape[0] - 1
    _require(modes.shape[0] == num_spans, f"span_modes must have one entry per span ({num_spans}), "
                                          f"got {modes.shape[0]}")
    _require(span_sample.shape[0] == num_spans, f"span_sample must have one entry per span "
                                                f"({num_spans}), got {span_sample.shape[0]}")
    _require(block_q >= 1, f"block_q must be >= 1, got {block_q}")
    _require(block_k >= 1, f"block_k must be >= 1, got {block_k}")
    _check_layout(cu, bounds, modes, span_sample)

    total = int(cu[-1])
    # A tile longer than the pack acts like one of T + 1 tokens (one partial tile); clamping
    # keeps the int64 tile arithmetic below from overflowing for absurd block sizes.
    block_q, block_k = min(block_q, total + 1), min(block_k, total + 1)
    num_q_tiles, num_k_tiles = -(-total // block_q), -(-total // block_k)
    if total == 0:
        empty = np.zeros(0, np.int32)
        return np.zeros(1, np.int32), empty, empty.copy(), np.zeros(1, np.int32), empty.copy(), empty.copy()
    bounds = bounds.astype(np.int64)
    cu = cu.astype(np.int64)
    starts, ends = bounds[:-1], bounds[1:]
    is_noise = modes == NOISE
    noise_prefix = np.concatenate([[0], np.cumsum(np.where(is_noise, ends - starts, 0))])

    def noise_before(t: np.ndarray) -> np.ndarray:
        """Noise tokens in [0, t) for t in [0, T]."""
        p = np.minimum(np.searchsorted(bounds, t, side="right") - 1, num_spans - 1)
        return noise_prefix[p] + np.where(is_noise[p], t - starts[p], 0)

    # Segments: query tiles cut at span boundaries, in token order.
    cuts = np.union1d(bounds, np.arange(0, total, block_q, dtype=np.int64))
    a, b = cuts[:-1], cuts[1:]
    span = np.searchsorted(bounds, a, side="right") - 1
    tile = a // block_q
    sample_start = cu[span_sample[span]]
    causal = modes[span] == CAUSAL
    x_union = np.where(causal, b - 1, ends[span] - 1)
    x_intersect = np.where(causal, a, ends[span] - 1)
    noise_before_start = noise_before(sample_start)
    noise_before_union_end = noise_before(x_union + 1)
    own_noise_begin = np.where(is_noise[span], starts[span], -1)

    # Candidate key tiles of query tile i: [first_kt[i], last_kt[i]] (sample starts and
    # x_union never decrease along a tile's segments, but take the max to be safe).
    tile_first_segment = np.flatnonzero(np.concatenate([[True], tile[1:] != tile[:-1]]))
    first_kt = sample_start[tile_first_segment] // block_k
    last_kt = np.maximum.reduceat(x_union // block_k, tile_first_segment)
    width = last_kt - first_kt + 1
    grid_start = _exclusive_cumsum(width)  # the (tile, key tile) grid, tile-major

    # One pair per (segment, candidate key tile of its query tile).
    seg_width = width[tile]
    pair_seg = np.repeat(np.arange(span.shape[0]), seg_width)
    pair_offset = np.arange(pair_seg.shape[0]) - np.repeat(_exclusive_cumsum(seg_width), seg_width)
    pair_tile = tile[pair_seg]
    j = first_kt[pair_tile] + pair_offset
    k0, k_last = j * block_k, j * block_k + block_k - 1
    key_noise_lo = noise_before(np.minimum(k0, total))
    key_noise_hi = noise_before(np.minimum(k_last + 1, total))

    ss = sample_start[pair_seg]
    xu = x_union[pair_seg]
    own = own_noise_begin[pair_seg]
    lo, hi = np.maximum(k0, ss), np.minimum(k_last, xu)
    # Noise is monotone in t, so noise in [lo, hi] follows from the clamped ends.
    noise = (np.minimum(key_noise_hi, noise_before_union_end[pair_seg])
             - np.maximum(key_noise_lo, noise_before_start[pair_seg]))
    own_any = np.where(own < 0, 0, np.maximum(0, hi - np.maximum(lo, own) + 1))
    pair_any = (lo <= hi) & ((hi - lo + 1) - (noise - own_any) > 0)
    own_tile = np.where(own < 0, 0, np.maximum(0, k_last - np.maximum(k0, own) + 1))
    pair_full = ((lo <= hi) & (k0 >= ss) & (k_last <= x_intersect[pair_seg]) & (k_last < total)
                 & (key_noise_hi - key_noise_lo == own_tile))

    grid_size = int(width.sum())
    pair_pos = grid_start[pair_tile] + pair_offset
    grid_any = np.bincount(pair_pos, weights=pair_any, minlength=grid_size) > 0
    grid_not_full = np.bincount(pair_pos, weights=~pair_full, minlength=grid_size) > 0
    grid_tile = np.repeat(np.arange(num_q_tiles), width)
    grid_j = np.repeat(first_kt, width) + (np.arange(grid_size) - np.repeat(grid_start, width))
    grid_full = ~grid_not_full & ((grid_tile + 1) * block_q <= total)

    rows = grid_tile[grid_any]
    _require(rows.shape[0] <= _INT32_MAX, "more than 2**31 - 1 visible tiles: use larger "
                                          "block_q / block_k")
    k_tile_idx = grid_j[grid_any].astype(np.int32)
    k_tile_full = grid_full[grid_any].astype(np.int32)
    q_tile_ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=num_q_tiles))])
    # Transpose: a stable sort by key tile keeps each column's query tiles ascending.
    order = np.argsort(k_tile_idx, kind="stable")
    k_tile_ptr = np.concatenate([[0], np.cumsum(np.bincount(k_tile_idx, minlength=num_k_tiles))])
    return (q_tile_ptr.astype(np.int32), k_tile_idx, k_tile_full, k_tile_ptr.astype(np.int32),
            rows[order].astype(np.int32), k_tile_full[order])
