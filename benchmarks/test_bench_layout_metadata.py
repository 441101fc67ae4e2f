"""Host time of the per-pack helpers: tile metadata of a 64k-token pack, and packing.

DESIGN.md 3.4 asks for the metadata of a 64k-token pack in well under a millisecond of
host time; these run on the CPU (no GPU involved) and compare the C++ helpers with their
numpy twins side by side (numpy is the baseline of each group).
"""
from __future__ import annotations

import numpy as np
import pytest

from unimrg_fast import packing
from unimrg_fast.packing import CAUSAL, FULL, NOISE

IMPLS = ["native", "numpy"]
PACK_TOKENS = 65536


def umm_pack(total: int = PACK_TOKENS, seed: int = 0):
    """The four layout arrays of a pack filled like a UniMRG / SGT pack (about 40 samples):
    generation samples [1088 full | 8-48 causal | 1024 noise], understanding samples
    [1088 full | 32-512 causal], and a causal padding sample to `total` tokens."""
    rng = np.random.default_rng(seed)
    samples, used = [], 0
    while True:
        if rng.random() < 0.5:
            sample = [(1088, FULL), (int(rng.integers(8, 49)), CAUSAL), (1024, NOISE)]
        else:
            sample = [(1088, FULL), (int(rng.integers(32, 513)), CAUSAL)]
        length = sum(n for n, _ in sample)
        if used + length > total:
            break
        samples.append(sample)
        used += length
    if used < total:
        samples.append([(total - used, CAUSAL)])
    lengths = [n for sample in samples for n, _ in sample]
    cu = np.concatenate([[0], np.cumsum([sum(n for n, _ in s) for s in samples])]).astype(np.int32)
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    modes = np.array([m for sample in samples for _, m in sample], np.int32)
    span_sample = np.array([s for s, sample in enumerate(samples) for _ in sample], np.int32)
    return cu, bounds, modes, span_sample


def _skip_if_unavailable(impl: str) -> None:
    if impl == "native" and not packing.NATIVE_AVAILABLE:
        pytest.skip("unimrg_fast._native is not built (pip install -e . or "
                    "python setup.py build_ext --inplace)")


@pytest.mark.benchmark(group="layout-metadata")
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_tile_metadata_64k(benchmark, impl):
    """Both tile sets packed_attention builds on a new layout (forward / dq and dk / dv,
    an H100 / H200's tiles for bf16 at head dim 128): the per-pack host cost."""
    import torch

    from unimrg_fast.ops.packed_attention import tile_sizes

    _skip_if_unavailable(impl)
    arrays = umm_pack()
    sizes = tile_sizes(torch.bfloat16, 128, PACK_TOKENS)
    both = benchmark(lambda: [packing.tile_metadata(*arrays, bq, bk, impl=impl)
                              for bq, bk in sizes])
    benchmark.extra_info.update(role="baseline" if impl == "numpy" else "fused",
                                num_tokens=int(arrays[0][-1]), num_samples=len(arrays[0]) - 1,
                                num_spans=len(arrays[2]), tile_sizes=[list(t) for t in sizes],
                                visible_tiles=[len(t.k_tile_idx) for t in both],
                                full_tiles=[int(t.k_tile_full.sum()) for t in both])
    for (bq, _), tiles in zip(sizes, both):
        assert len(tiles.q_tile_ptr) == PACK_TOKENS // bq + 1
        assert 0 < tiles.k_tile_full.sum() < len(tiles.k_tile_idx)


@pytest.mark.benchmark(group="packing")
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_pack_first_fit_decreasing_10k(benchmark, impl):
    _skip_if_unavailable(impl)
    lengths = np.random.default_rng(0).integers(100, 4200, 10_000)
    assignment = benchmark(packing.pack_first_fit_decreasing, lengths, PACK_TOKENS, impl=impl)
    num_packs = int(assignment.max()) + 1
    benchmark.extra_info.update(role="baseline" if impl == "numpy" else "fused",
                                num_samples=len(lengths), num_packs=num_packs)
    loads = np.bincount(assignment, weights=lengths)
    assert (assignment >= 0).all() and loads.max() <= PACK_TOKENS
