"""unimrg_fast.packing: first-fit-decreasing packing, StreamingPacker, tile metadata.

The C++ helpers and their numpy twins must agree exactly, and both must agree with
oracles written here from the definitions: a plain first-fit-decreasing loop, and a dense
[T, T] mask built from the attention rule of DESIGN.md 3.4, reduced per tile.
"""
from __future__ import annotations

import numpy as np
import pytest

from unimrg_fast import _packing_numpy, packing
from unimrg_fast.packing import CAUSAL, FULL, NOISE, OVERFLOW, REJECTED

needs_native = pytest.mark.skipif(
    not packing.NATIVE_AVAILABLE,
    reason="unimrg_fast._native is not built (python setup.py build_ext --inplace)")
IMPLS = ["numpy", pytest.param("native", marks=needs_native)]
BLOCKS = [(16, 16), (32, 16), (16, 32), (128, 64), (1, 1), (7, 5)]


# ----------------------------------------------------------------------------- packing
def ffd_oracle(lengths, max_tokens, max_packs=0):
    """First-fit decreasing exactly as documented, written the obvious way."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    remaining, out = [], [REJECTED] * len(lengths)
    for i in order:
        if lengths[i] > max_tokens:
            continue
        pack = next((p for p, room in enumerate(remaining) if room >= lengths[i]), None)
        if pack is None:
            if 0 < max_packs <= len(remaining):
                out[i] = OVERFLOW
                continue
            remaining.append(max_tokens)
            pack = len(remaining) - 1
        remaining[pack] -= lengths[i]
        out[i] = pack
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_ffd_hand_checked(impl):
    # Sorted: 7(i2) 6(i5) 5(i0) 4(i4) 3(i1) 2(i3) 1(i6) into packs of 10:
    # 7 -> P0 (3 left), 6 -> P1 (4), 5 -> P2 (5), 4 -> P1 (0), 3 -> P0 (0), 2 -> P2, 1 -> P2.
    lengths = [5, 3, 7, 2, 4, 6, 1]
    got = packing.pack_first_fit_decreasing(lengths, 10, impl=impl)
    assert got.dtype == np.int64
    assert got.tolist() == [2, 0, 0, 2, 1, 1, 2]
    # Two packs at most: 5, 2 and 1 find no room in P0 / P1 and overflow; 11 is rejected.
    got = packing.pack_first_fit_decreasing(lengths + [11], 10, max_packs=2, impl=impl)
    assert got.tolist() == [OVERFLOW, 0, 0, OVERFLOW, 1, 1, OVERFLOW, REJECTED]
    # Ties go to the lower index: i1 and i3 (4 each) open P0 and P1, then i0 and i2 follow.
    assert packing.pack_first_fit_decreasing([2, 4, 2, 4], 6, impl=impl).tolist() == [0, 0, 1, 1]
    assert packing.pack_first_fit_decreasing([], 6, impl=impl).tolist() == []
    # One sample per pack: as many packs as the C++ tree's bound (2 * tokens / max + 2) allows.
    assert packing.pack_first_fit_decreasing([2] * 101, 3, impl=impl).tolist() == list(range(101))
    assert packing.pack_first_fit_decreasing([1] * 50, 1, impl=impl).tolist() == list(range(50))


def _random_lengths(rng, max_tokens):
    n = int(rng.integers(0, 250))
    kind = rng.integers(3)
    if kind == 0:  # many ties
        return rng.integers(1, 6, n) * max(1, max_tokens // 7)
    high = max_tokens + max_tokens // 3 + 2 if kind == 1 else max(2, max_tokens // 4)
    return rng.integers(1, high, n)


def _check_ffd_properties(lengths, max_tokens, max_packs, got):
    lengths, got = np.asarray(lengths), np.asarray(got)
    np.testing.assert_array_equal(got == REJECTED, lengths > max_tokens,
                                  err_msg="-2 must mark exactly the samples longer than max_tokens")
    assert got.min(initial=0) >= REJECTED
    num_packs = int(got.max(initial=-1)) + 1
    loads = np.bincount(got[got >= 0], weights=lengths[got >= 0], minlength=num_packs)
    assert (loads <= max_tokens).all(), f"overfull pack: loads {loads.max()} > {max_tokens}"
    assert (loads > 0).all(), "pack indices must be contiguous from 0"
    if max_packs <= 0:
        assert not (got == OVERFLOW).any(), "unlimited packs never overflow"
    else:
        assert num_packs <= max_packs
        # Remaining room only shrinks, so an overflowed sample still fits no pack at the end.
        for length in lengths[got == OVERFLOW]:
            assert num_packs == max_packs and (max_tokens - loads < length).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_ffd_random_against_oracle(impl):
    rng = np.random.default_rng(0)
    for trial in range(120):
        max_tokens = int(rng.integers(1, 400))
        max_packs = int(rng.choice([0, 0, -3, 1, 2, 5]))
        lengths = _random_lengths(rng, max_tokens)
        got = packing.pack_first_fit_decreasing(lengths, max_tokens, max_packs, impl=impl)
        expected = ffd_oracle(lengths.tolist(), max_tokens, max_packs)
        assert got.tolist() == expected, f"trial {trial}: max_tokens={max_tokens}, max_packs={max_packs}"
        _check_ffd_properties(lengths, max_tokens, max_packs, got)


@needs_native
def test_ffd_native_matches_numpy():
    rng = np.random.default_rng(1)
    for trial in range(300):
        max_tokens = int(rng.integers(1, 5000))
        max_packs = int(rng.choice([0, 1, 3, 8]))
        lengths = _random_lengths(rng, max_tokens)
        native = packing.pack_first_fit_decreasing(lengths, max_tokens, max_packs, impl="native")
        twin = packing.pack_first_fit_decreasing(lengths, max_tokens, max_packs, impl="numpy")
        np.testing.assert_array_equal(native, twin, err_msg=f"trial {trial}")


@pytest.mark.parametrize("impl", IMPLS)
def test_ffd_bad_arguments(impl):
    ffd = packing.pack_first_fit_decreasing
    with pytest.raises(ValueError, match=r"lengths\[2\] must be >= 1, got 0"):
        ffd([3, 1, 0, 2], 10, impl=impl)
    with pytest.raises(ValueError, match="max_tokens"):
        ffd([3], 0, impl=impl)
    with pytest.raises(TypeError, match="max_tokens"):
        ffd([3], 10.0, impl=impl)
    with pytest.raises(TypeError, match="max_packs"):
        ffd([3], 10, True, impl=impl)
    with pytest.raises(TypeError, match="lengths"):
        ffd([1.5, 2.0], 10, impl=impl)
    with pytest.raises(ValueError, match="lengths must be 1-D"):
        ffd([[1, 2]], 10, impl=impl)
    with pytest.raises(ValueError, match="impl"):
        ffd([1], 10, impl="cuda")


@needs_native
def test_ffd_raw_backends_reject_alike():
    from unimrg_fast import _native

    for backend in (_native, _packing_numpy):
        with pytest.raises(ValueError, match=r"^lengths\[1\] must be >= 1, got -4$"):
            backend.pack_first_fit_decreasing(np.array([2, -4], np.int64), 5, 0)
        with pytest.raises(ValueError, match=r"^max_tokens must be >= 1, got 0$"):
            backend.pack_first_fit_decreasing(np.array([2], np.int64), 0, 0)


def test_native_requested_but_missing(monkeypatch):
    monkeypatch.setattr(packing, "_native", None)
    with pytest.raises(RuntimeError, match="pip install -e"):
        packing.pack_first_fit_decreasing([1], 4, impl="native")
    assert packing.pack_first_fit_decreasing([3, 2], 4, impl="auto").tolist() == [0, 1]


@pytest.mark.parametrize("impl", IMPLS)
def test_streaming_packer_loses_nothing(impl):
    rng = np.random.default_rng(2)
    for max_packs in (0, 1, 3):
        packer = packing.StreamingPacker(max_tokens=100, max_packs=max_packs, impl=impl)
        added, out, length_of = [], [], {}

        def take(packs):
            assert max_packs <= 0 or len(packs) <= max_packs
            assert all(0 < sum(length_of[i] for i in pack) <= 100 for pack in packs)
            out.extend(i for pack in packs for i in pack)

        for round_ in range(8):
            n = int(rng.integers(0, 40))
            ids = [f"r{round_}s{i}" for i in range(n)]
            lengths = rng.integers(1, 130, n)
            packer.add(ids, lengths)
            added += ids
            length_of.update(zip(ids, lengths.tolist()))
            take(packer.pop_packs())
            if max_packs <= 0:
                assert packer.pending == 0
        for _ in range(1000):  # drain: every pop packs at least one buffered sample
            if not packer.pending:
                break
            take(packer.pop_packs())
        assert packer.pending == 0 and packer.pop_packs() == []
        out += packer.rejected
        assert sorted(out) == sorted(added), "every added id must come out exactly once"
        assert len(packer.rejected) > 0, "lengths up to 129 with max_tokens 100 must reject some"


@pytest.mark.parametrize("impl", IMPLS)
def test_streaming_packer_state_round_trip_pops_the_same_packs(impl):
    rng = np.random.default_rng(7)
    straight = packing.StreamingPacker(max_tokens=64, max_packs=2, impl=impl)
    straight.add(range(30), rng.integers(1, 70, 30))
    first = straight.pop_packs()
    state = straight.state_dict()
    assert state["ids"] and state["rejected"]   # something buffered, something too long
    restored = packing.StreamingPacker(max_tokens=64, max_packs=2, impl=impl)
    restored.load_state_dict(state)
    more = rng.integers(1, 64, 10)
    for packer in (straight, restored):
        packer.add(range(30, 40), more)
    while straight.pending:
        assert restored.pop_packs() == straight.pop_packs()
    assert restored.pending == 0 and restored.rejected == straight.rejected
    assert first   # the first pop did pack
    with pytest.raises(ValueError, match="same length"):
        restored.load_state_dict({"ids": [1], "lengths": [], "rejected": []})


@pytest.mark.parametrize("impl", IMPLS)
def test_a_state_from_a_larger_packer_rejects_what_no_longer_fits(impl):
    # every id still leaves exactly once: the too-long one was kept pending forever
    big = packing.StreamingPacker(max_tokens=100, max_packs=1, impl=impl)
    big.add(["x", "y"], [80, 30])
    small = packing.StreamingPacker(max_tokens=50, impl=impl)
    small.load_state_dict(big.state_dict())
    assert small.pending == 1 and small.rejected == ["x"]
    assert small.pop_packs() == [["y"]] and small.pending == 0
    before = small.state_dict()
    with pytest.raises(ValueError, match=r"lengths\[1\] must be >= 1"):
        small.load_state_dict({"ids": ["a", "b"], "lengths": [3, 0], "rejected": []})
    assert small.state_dict() == before   # all or nothing


@pytest.mark.parametrize("impl", IMPLS)
def test_streaming_packer_overflow_goes_first(impl):
    packer = packing.StreamingPacker(max_tokens=10, max_packs=1, impl=impl)
    packer.add(["a", "b", "big"], [6, 6, 11])
    assert packer.rejected == ["big"] and packer.pending == 2
    assert packer.pop_packs() == [["a"]]
    packer.add(["c", "d"], [6, 4])
    # b (buffered) ties with c (newer) at 6 tokens and wins; d fills b's pack.
    assert packer.pop_packs() == [["b", "d"]]
    assert packer.pop_packs() == [["c"]]
    assert packer.pending == 0
    with pytest.raises(ValueError, match=r"lengths\[1\]"):
        packer.add(["x", "y"], [3, 0])
    with pytest.raises(ValueError, match="same length"):
        packer.add(["x"], [3, 4])
    assert packer.pending == 0, "a failed add must buffer nothing"
    with pytest.raises(ValueError, match="max_tokens"):
        packing.StreamingPacker(max_tokens=0)


# ------------------------------------------------------------------------ tile metadata
def layout_arrays(samples):
    """samples: [[(length, mode), ...], ...] -> the four int32 layout arrays."""
    lengths = [n for sample in samples for n, _ in sample]
    modes = [m for sample in samples for _, m in sample]
    span_sample = [s for s, sample in enumerate(samples) for _ in sample]
    seqlens = [sum(n for n, _ in sample) for sample in samples]
    cu = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return cu, bounds, np.array(modes, np.int32), np.array(span_sample, np.int32)


def random_samples(rng, max_spans=5, long_span=40):
    samples = []
    for _ in range(int(rng.integers(1, 7))):
        spans = []
        for _ in range(int(rng.integers(1, max_spans + 1))):
            length = int(rng.choice([1, int(rng.integers(1, 9)), int(rng.integers(1, long_span + 1))]))
            spans.append((length, int(rng.integers(3))))
        samples.append(spans)
    return samples


def dense_mask(cu, bounds, modes, span_sample):
    """[T, T] bool straight from the rule: same sample; k <= q or inside the same full /
    noise span; noise keys only from their own span."""
    span = np.repeat(np.arange(len(modes)), np.diff(bounds))
    sample, mode = span_sample[span], modes[span]
    q, k = np.arange(len(span))[:, None], np.arange(len(span))[None, :]
    same_span = span[:, None] == span[None, :]
    rule2 = (k <= q) | (same_span & np.isin(mode, (FULL, NOISE))[:, None])
    rule3 = (mode[None, :] != NOISE) | same_span
    return (sample[:, None] == sample[None, :]) & rule2 & rule3


def tiles_oracle(mask, block_q, block_k):
    """The six arrays from a dense mask: padding counts as masked, so full implies in bounds."""
    total = mask.shape[0]
    nq, nk = -(-total // block_q), -(-total // block_k)
    padded = np.zeros((nq * block_q, nk * block_k), bool)
    padded[:total, :total] = mask
    blocks = padded.reshape(nq, block_q, nk, block_k)
    visible, full = blocks.any(axis=(1, 3)), blocks.all(axis=(1, 3))
    rows, cols = np.nonzero(visible)
    cols_t, rows_t = np.nonzero(visible.T)
    ptr = lambda counts: np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return (ptr(visible.sum(1)), cols.astype(np.int32), full[rows, cols].astype(np.int32),
            ptr(visible.sum(0)), rows_t.astype(np.int32), full[rows_t, cols_t].astype(np.int32))


def assert_same_tiles(got, expected, context):
    names = packing.TileArrays._fields
    assert len(got) == 6
    for name, g, e in zip(names, got, expected):
        assert g.dtype == np.int32, f"{context}: {name} has dtype {g.dtype}"
        if g.shape != e.shape or not np.array_equal(g, e):
            where = (np.flatnonzero(g[:len(e)] != e[:len(g)])[:5] if g.shape != e.shape
                     else np.flatnonzero(g != e)[:5])
            raise AssertionError(f"{context}: {name} differs (shapes {g.shape} vs {e.shape}) "
                                 f"first at {where}: got {g[where[:1]]} expected {e[where[:1]]}")


def test_tiles_hand_checked_example():
    # The docstring's picture: [full 3 | causal 2], [causal 2 | noise 3], tiles 2 x 2.
    arrays = layout_arrays([[(3, FULL), (2, CAUSAL)], [(2, CAUSAL), (3, NOISE)]])
    got = packing.tile_metadata(*arrays, 2, 2)
    grid = [["."] * 5 for _ in range(5)]
    for i in range(5):
        for e in range(got.q_tile_ptr[i], got.q_tile_ptr[i + 1]):
            grid[i][got.k_tile_idx[e]] = "F" if got.k_tile_full[e] else "P"
    assert ["".join(row) for row in grid] == ["FP...", "FP...", "PPP..", "..PPP", "..PFF"]


@pytest.mark.parametrize("impl", IMPLS)
def test_tiles_against_dense_oracle(impl):
    rng = np.random.default_rng(3)
    for trial in range(50):
        arrays = layout_arrays(random_samples(rng))
        mask = dense_mask(*arrays)
        for block_q, block_k in BLOCKS:
            got = packing.tile_metadata(*arrays, block_q, block_k, impl=impl)
            assert_same_tiles(got, tiles_oracle(mask, block_q, block_k),
                              f"trial {trial}, T={mask.shape[0]}, blocks {block_q}x{block_k}")


@pytest.mark.parametrize("impl", IMPLS)
def test_tiles_edge_layouts(impl):
    cases = [
        [[(1, CAUSAL)]],
        [[(1, NOISE)]],
        [[(1, FULL)], [(1, NOISE)], [(1, CAUSAL)]],
        [[(16, NOISE), (16, NOISE)]],                # noise spans hide from each other
        [[(32, FULL)], [(32, CAUSAL)]],              # tile-aligned: full tiles exist
        [[(5, CAUSAL), (20, NOISE), (3, CAUSAL), (20, NOISE), (9, FULL)]],
    ]
    for samples in cases:
        arrays = layout_arrays(samples)
        mask = dense_mask(*arrays)
        for block_q, block_k in BLOCKS + [(16, 1), (1, 16), (300, 300)]:
            got = packing.tile_metadata(*arrays, block_q, block_k, impl=impl)
            assert_same_tiles(got, tiles_oracle(mask, block_q, block_k),
                              f"{samples}, blocks {block_q}x{block_k}")
    aligned = packing.tile_metadata(*layout_arrays(cases[4]), 16, 16, impl=impl)
    assert aligned.k_tile_full.sum() == 5, "4 tiles in the full image, 1 below the causal diagonal"
    huge = packing.tile_metadata(*layout_arrays(cases[5]), 2 ** 62, 2 ** 63 - 1, impl=impl)
    assert [a.tolist() for a in huge] == [[0, 1], [0], [0], [0, 1], [0], [0]]
    empty = packing.tile_metadata([0], [0], [], [], 16, 16, impl=impl)
    assert [a.tolist() for a in empty] == [[0], [], [], [0], [], []]


def _umm_like_samples(rng, total):
    samples, used = [], 0
    while True:
        if rng.random() < 0.5:
            sample = [(1088, FULL), (int(rng.integers(8, 49)), CAUSAL), (1024, NOISE)]
        else:
            sample = [(int(rng.integers(1, 300)), FULL), (int(rng.integers(1, 513)), CAUSAL)]
        if used + sum(n for n, _ in sample) > total:
            break
        samples.append(sample)
        used += sum(n for n, _ in sample)
    return samples + ([[(total - used, CAUSAL)]] if total > used else [])


def _check_transpose(got, nq, nk):
    q_ptr, k_idx, k_full, k_ptr, q_idx, q_full = got
    assert q_ptr[0] == 0 and k_ptr[0] == 0 and q_ptr[-1] == k_ptr[-1] == len(k_idx) == len(q_idx)
    assert len(q_ptr) == nq + 1 and len(k_ptr) == nk + 1
    assert (np.diff(q_ptr) >= 1).all(), "every query tile sees at least its own tokens"
    rows = np.repeat(np.arange(nq), np.diff(q_ptr))
    cols = np.repeat(np.arange(nk), np.diff(k_ptr))
    forward = sorted(zip(rows.tolist(), k_idx.tolist(), k_full.tolist()))
    backward = sorted(zip(q_idx.tolist(), cols.tolist(), q_full.tolist()))
    assert forward == backward, "the backward CSR must be the exact transpose"
    # Ascending within every row / column: the key strictly increases inside each segment.
    assert (np.diff(rows * nk + k_idx) > 0).all() and (np.diff(cols * nq + q_idx) > 0).all()


@needs_native
def test_tiles_native_matches_numpy_on_large_packs():
    rng = np.random.default_rng(4)
    for trial in range(12):
        total = int(rng.integers(2000, 12000))
        arrays = layout_arrays(_umm_like_samples(rng, total) if trial % 2 else
                               random_samples(rng, max_spans=8, long_span=900))
        total = int(arrays[0][-1])
        for block_q, block_k in [(128, 64), (64, 128), (16, 16), (100, 37)]:
            native = packing.tile_metadata(*arrays, block_q, block_k, impl="native")
            twin = packing.tile_metadata(*arrays, block_q, block_k, impl="numpy")
            assert_same_tiles(native, twin, f"trial {trial}, T={total}, blocks {block_q}x{block_k}")
            _check_transpose(native, -(-total // block_q), -(-total // block_k))


@pytest.mark.parametrize("impl", IMPLS)
def test_tiles_transpose_consistent(impl):
    rng = np.random.default_rng(5)
    for _ in range(10):
        arrays = layout_arrays(random_samples(rng, long_span=200))
        total = int(arrays[0][-1])
        for block_q, block_k in BLOCKS:
            got = packing.tile_metadata(*arrays, block_q, block_k, impl=impl)
            _check_transpose(got, -(-total // block_q), -(-total // block_k))


_GOOD = dict(cu_seqlens=[0, 5, 9], span_bounds=[0, 3, 5, 9], span_modes=[1, 0, 2], span_sample=[0, 0, 1])
BAD_LAYOUTS = [  # (changes, pattern the ValueError must match)
    (dict(cu_seqlens=[1, 5, 9]), r"cu_seqlens\[0\] must be 0"),
    (dict(cu_seqlens=[0, 5, 5, 9]), r"cu_seqlens must be strictly increasing"),
    (dict(span_bounds=[0, 3, 3, 9]), r"span_bounds must be strictly increasing"),
    (dict(span_bounds=[0, 3, 5, 8]), r"span_bounds\[-1\] = 8 must equal cu_seqlens\[-1\] = 9"),
    (dict(span_modes=[1, 3, 2]), r"span_modes\[1\] must be 0 \(causal\), 1 \(full\) or 2"),
    (dict(span_modes=[1, 0]), r"span_modes must have one entry per span \(3\)"),
    (dict(span_sample=[0, 0]), r"span_sample must have one entry per span"),
    (dict(span_sample=[1, 1, 1]), r"span_sample must start at 0"),
    (dict(cu_seqlens=[0, 3, 9], span_sample=[0, 1, 0]), r"step by 0 or 1 .*span_sample\[2\] = 0"),
    (dict(span_sample=[0, 0, 2]), r"step by 0 or 1 .*span_sample\[2\] = 2"),
    (dict(span_sample=[0, 1, 1]), r"span_sample is inconsistent with cu_seqlens: span 1"),
    (dict(span_sample=[0, 0, 0]), r"span_sample must end at the last sample 1"),
    (dict(cu_seqlens=[0, 4, 9]), r"span_sample is inconsistent with cu_seqlens: span 2"),
    (dict(cu_seqlens=[0, 9], span_sample=[0, 0, 1]), r"span_sample\[2\] = 1 is not a sample index"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("changes, pattern", BAD_LAYOUTS)
def test_tiles_bad_layout(impl, changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        packing.tile_metadata(**{**_GOOD, **changes}, block_q=16, block_k=16, impl=impl)


@needs_native
@pytest.mark.parametrize("changes, pattern", BAD_LAYOUTS)
def test_tiles_raw_backends_reject_alike(changes, pattern):
    from unimrg_fast import _native

    arrays = [np.asarray(v, np.int32) for v in {**_GOOD, **changes}.values()]
    messages = []
    for backend in (_native, _packing_numpy):
        with pytest.raises(ValueError, match=pattern) as info:
            backend.tile_metadata(*arrays, 16, 16)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("impl", IMPLS)
def test_tiles_bad_arguments(impl):
    call = lambda **kw: packing.tile_metadata(**{**_GOOD, "block_q": 16, "block_k": 16,
                                                 "impl": impl, **kw})
    assert call().q_tile_ptr.tolist() == [0, 1]
    with pytest.raises(ValueError, match="block_q"):
        call(block_q=0)
    with pytest.raises(ValueError, match="block_k"):
        call(block_k=-2)
    with pytest.raises(TypeError, match="block_k"):
        call(block_k=True)
    with pytest.raises(TypeError, match="cu_seqlens"):
        call(cu_seqlens=[0.0, 5.0, 9.0])
    with pytest.raises(ValueError, match="span_modes must be 1-D"):
        call(span_modes=[[1, 0, 2]])
    with pytest.raises(ValueError, match="span_bounds must fit in int32"):
        call(span_bounds=np.array([0, 3, 5, 2 ** 40], np.int64))
    # int64 inputs that fit are converted, not rejected.
    assert call(span_bounds=np.array([0, 3, 5, 9], np.int64)).q_tile_ptr.tolist() == [0, 1]
