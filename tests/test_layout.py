"""PackedLayout: the mask rule, the arrays it carries, validation, identity, devices, tiles.

The oracles here are written from DESIGN.md 3.4 directly (Python loops over the span
list), never from the code under test.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unimrg_fast.layout import DENSE_MASK_MAX_TOKENS, PackedLayout, TileMetadata

MODES = ("causal", "full", "noise")
MODE_ID = {"causal": 0, "full": 1, "noise": 2}
FIELDS = ("cu_seqlens", "span_bounds", "span_modes", "span_sample", "token_sample", "token_span")


# --------------------------------------------------------------------------- oracles
def rule_mask(samples) -> np.ndarray:
    """[T, T] bool by the rule, pair by pair, from the span list."""
    tokens = []  # (sample, global span, mode)
    span_id = 0
    for s, sample in enumerate(samples):
        for length, mode in sample:
            tokens += [(s, span_id, mode)] * length
            span_id += 1
    mask = np.zeros((len(tokens), len(tokens)), dtype=bool)
    for i, (sq, pq, mq) in enumerate(tokens):
        for j, (sk, pk, mk) in enumerate(tokens):
            mask[i, j] = (sq == sk and (j <= i or (pq == pk and mq != "causal"))
                          and (mk != "noise" or pq == pk))
    return mask


def assert_mask_equal(got: torch.Tensor, want: np.ndarray, what: str) -> None:
    got = got.cpu().numpy()
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    wrong = np.argwhere(got != want)
    if wrong.size:
        q, k = wrong[0]
        raise AssertionError(f"{what}: {len(wrong)} wrong entries; first at query {q}, key {k}: "
                             f"got {got[q, k]}, expected {want[q, k]}")


def random_samples(rng, num_samples, max_len=9):
    samples = []
    for _ in range(num_samples):
        spans = []
        for _ in range(int(rng.integers(1, 7))):
            length = 1 if rng.random() < 0.3 else int(rng.integers(1, max_len + 1))
            spans.append((length, MODES[int(rng.integers(0, 3))]))
        samples.append(spans)
    return samples


# --------------------------------------------------------------------------- the rule
# Two samples: [image full 2 | text causal 2 | target noise 2] and
# [text causal 1 | noise 2 | text causal 1 | image full 2]; 1 = query (row) sees key (column).
PICTURE = """
    q\\k 0 1 2 3 4 5 6 7 8 9 A B
    0    1 1 . . . . . . . . . .
    1    1 1 . . . . . . . . . .
    2    1 1 1 . . . . . . . . .
    3    1 1 1 1 . . . . . . . .
    4    1 1 1 1 1 1 . . . . . .
    5    1 1 1 1 1 1 . . . . . .
    6    . . . . . . 1 . . . . .
    7    . . . . . . 1 1 1 . . .
    8    . . . . . . 1 1 1 . . .
    9    . . . . . . 1 . . 1 . .
    A    . . . . . . 1 . . 1 1 1
    B    . . . . . . 1 . . 1 1 1
"""
PICTURE_SAMPLES = [[(2, "full"), (2, "causal"), (2, "noise")],
                   [(1, "causal"), (2, "noise"), (1, "causal"), (2, "full")]]


def test_dense_mask_matches_hand_written_picture():
    rows = [line.split()[1:] for line in PICTURE.strip().splitlines()[1:]]
    want = np.array([[c == "1" for c in row] for row in rows])
    assert want.shape == (12, 12)
    layout = PackedLayout.from_spans(PICTURE_SAMPLES)
    assert_mask_equal(layout.dense_mask(), want, "dense_mask vs picture")
    assert_mask_equal(torch.from_numpy(rule_mask(PICTURE_SAMPLES)), want, "oracle vs picture")


@pytest.mark.parametrize("seed", range(12))
def test_dense_mask_matches_rule_on_random_layouts(seed):
    rng = np.random.default_rng(seed)
    samples = random_samples(rng, int(rng.integers(1, 6)))
    layout = PackedLayout.from_spans(samples)
    mask = layout.dense_mask()
    assert mask.dtype == torch.bool and mask.device == torch.device("cpu")
    want = rule_mask(samples)
    assert_mask_equal(mask, want, f"dense_mask of {samples}")
    assert mask.diagonal().all(), "every query must see itself"
    cu = layout.host("cu_seqlens")
    for s in range(layout.num_samples):
        a, b = int(cu[s]), int(cu[s + 1])
        assert_mask_equal(layout.sample_mask(s), want[a:b, a:b], f"sample_mask({s}) of {samples}")


def test_sample_mask_rejects_bad_index():
    layout = PackedLayout.from_spans([[(2, "full")], [(3, "causal")]])
    for bad in (-1, 2):
        with pytest.raises(ValueError, match=r"sample must be in \[0, 2\)"):
            layout.sample_mask(bad)


def test_dense_mask_refuses_a_huge_pack_but_sample_mask_works():
    layout = PackedLayout.from_spans([[(DENSE_MASK_MAX_TOKENS, "causal")], [(3, "noise")]])
    with pytest.raises(ValueError, match=f"T = {DENSE_MASK_MAX_TOKENS + 3} exceeds"):
        layout.dense_mask()
    assert layout.sample_mask(1).all()  # a lone noise span sees itself entirely


def test_sample_masks_are_cached_on_the_device_without_host_copies(monkeypatch):
    samples = [[(3, "full"), (2, "causal"), (4, "noise")], [(1, "causal")], [(5, "full")]]
    layout = PackedLayout.from_spans(samples)
    want = rule_mask(samples)
    # built from the layout's device ids: no host array is turned into a tensor
    monkeypatch.setattr(torch, "from_numpy", lambda *a: pytest.fail("host->device copy"))
    masks = layout.sample_masks()
    assert layout.sample_masks() is masks and len(masks) == 3
    cu = layout.host("cu_seqlens")
    for s, mask in enumerate(masks):
        a, b = int(cu[s]), int(cu[s + 1])
        assert mask.device == layout.device and mask.dtype == torch.bool
        assert_mask_equal(mask, want[a:b, a:b], f"sample_masks()[{s}]")
        fresh = layout.sample_mask(s)
        assert fresh is not mask and torch.equal(fresh, mask)  # sample_mask: a new tensor
    monkeypatch.undo()
    # the cache is no state of the layout: hash, equality and immutability are unchanged
    other = PackedLayout.from_spans(samples)
    assert other == layout and hash(other) == hash(layout)
    with pytest.raises(AttributeError, match="immutable"):
        layout.num_tokens = 3
    moved = layout.to("meta")  # another device gets its own masks, built there
    assert moved.sample_masks()[0].device.type == "meta"
    assert layout.sample_masks() is masks


# --------------------------------------------------------------------------- arrays
def test_arrays_contents_and_dtypes():
    layout = PackedLayout.from_spans([[(3, "full"), (1, "causal")], [(2, "noise")],
                                      [(1, "causal"), (1, "noise"), (2, "full")]])
    want = {
        "cu_seqlens": [0, 4, 6, 10],
        "span_bounds": [0, 3, 4, 6, 7, 8, 10],
        "span_modes": [1, 0, 2, 0, 2, 1],
        "span_sample": [0, 0, 1, 2, 2, 2],
        "token_sample": [0, 0, 0, 0, 1, 1, 2, 2, 2, 2],
        "token_span": [0, 0, 0, 1, 2, 2, 3, 4, 5, 5],
    }
    for name, values in want.items():
        tensor = getattr(layout, name)
        assert tensor.dtype == torch.int32, name
        assert tensor.device == torch.device("cpu"), name
        assert tensor.tolist() == values, name
        host = layout.host(name)
        assert host.dtype == np.int32 and host.tolist() == values, name
        with pytest.raises(ValueError):  # read-only view: the layout stays immutable
            host[0] = 7
    assert layout.num_tokens == 10 and layout.num_samples == 3 and layout.num_spans == 6
    assert layout.seqlens == (4, 2, 4) and layout.max_seqlen == 4
    assert layout.spans == (((3, 1), (1, 0)), ((2, 2),), ((1, 0), (1, 2), (2, 1)))
    assert "num_tokens=10" in repr(layout) and "noise=3" in repr(layout)


def test_pad_to_adds_one_causal_sample():
    samples = [[(3, "full"), (2, "noise")]]
    padded = PackedLayout.from_spans(samples, pad_to=12)
    assert padded.num_tokens == 12 and padded.seqlens == (5, 7)
    assert padded.cu_seqlens.tolist() == [0, 5, 12]
    assert padded.span_modes.tolist() == [1, 2, 0]
    assert padded.token_sample.tolist() == [0] * 5 + [1] * 7
    assert_mask_equal(padded.dense_mask(), rule_mask(samples + [[(7, "causal")]]), "padded mask")
    assert padded == PackedLayout.from_spans(samples + [[(7, "causal")]])
    exact = PackedLayout.from_spans(samples, pad_to=5)  # already full: no empty padding sample
    assert exact.num_samples == 1 and exact == PackedLayout.from_spans(samples)


@pytest.mark.parametrize("pad_to,exc,match", [
    (4, ValueError, "pad_to=4 is smaller than the samples' 5 tokens"),
    (0, ValueError, "pad_to=0 is smaller"),
    (8.0, TypeError, "pad_to must be an int, got float"),
    (True, TypeError, "pad_to must be an int, got bool"),
])
def test_pad_to_errors(pad_to, exc, match):
    with pytest.raises(exc, match=match):
        PackedLayout.from_spans([[(3, "full"), (2, "noise")]], pad_to=pad_to)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("samples,exc,match", [
    pytest.param([], ValueError, "samples is empty", id="no_samples"),
    pytest.param("causal", TypeError, "samples must be a list", id="samples_str"),
    pytest.param(5, TypeError, "samples must be a list", id="samples_int"),
    pytest.param([[(2, "full")], []], ValueError, "sample 1 is empty", id="empty_sample"),
    pytest.param([[(2, "full")], "full"], TypeError, "sample 1 must be a list", id="sample_str"),
    pytest.param([[(2, "full"), (0, "causal")]], ValueError,
                 "sample 0, span 1: length must be >= 1, got 0", id="zero_length"),
    pytest.param([[(1, "full")], [(1, "full"), (2, "causal"), (-3, "noise")]], ValueError,
                 "sample 1, span 2: length must be >= 1, got -3", id="negative_length"),
    pytest.param([[(1, "causal")], [(4, "image")]], ValueError,
                 "sample 1, span 0: unknown mode 'image'; expected one of causal, full, noise",
                 id="unknown_mode"),
    pytest.param([[(4, "FULL")]], ValueError, "sample 0, span 0: unknown mode 'FULL'",
                 id="mode_case"),
    pytest.param([[(1, "full"), (3,)]], TypeError,
                 r"sample 0, span 1: expected a \(length, mode\) pair, got \(3,\)", id="short_pair"),
    pytest.param([[(3, "full", 1)]], TypeError, r"sample 0, span 0: expected a \(length, mode\)",
                 id="long_pair"),
    pytest.param([[7]], TypeError, r"sample 0, span 0: expected a \(length, mode\) pair, got 7",
                 id="bare_int"),
    pytest.param([[(2.0, "full")]], TypeError, "sample 0, span 0: length must be an int, got 2.0",
                 id="float_length"),
    pytest.param([[(True, "full")]], TypeError, "sample 0, span 0: length must be an int, got True",
                 id="bool_length"),
    pytest.param([[("full", 3)]], TypeError, "sample 0, span 0: length must be an int, got 'full'",
                 id="swapped_pair"),
    pytest.param([[(3, ["full"])]], ValueError, r"sample 0, span 0: unknown mode \['full'\]",
                 id="list_mode"),
])
def test_from_spans_validation(samples, exc, match):
    with pytest.raises(exc, match=match):
        PackedLayout.from_spans(samples)


def test_from_spans_accepts_tuples_generators_and_numpy_ints():
    a = PackedLayout.from_spans([[(np.int64(3), "full"), (2, "causal")]])
    b = PackedLayout.from_spans(((s for s in ((3, "full"), (2, "causal"))),))
    assert a == b and a.spans == (((3, 1), (2, 0)),)
    assert type(a.spans[0][0][0]) is int
    padded = PackedLayout.from_spans([[(np.int64(3), "full")]], pad_to=np.int32(8))
    assert padded == PackedLayout.from_spans([[(3, "full")]], pad_to=8)
    with pytest.raises(TypeError, match="pad_to must be an int, got bool"):
        PackedLayout.from_spans([[(3, "full")]], pad_to=True)


def test_check_num_tokens():
    layout = PackedLayout.from_spans([[(3, "full")], [(4, "causal")]])
    layout.check_num_tokens(7, "q")
    with pytest.raises(ValueError, match=r"hidden has 8 tokens but the layout holds 7 \(samples \[3, 4\]\)"):
        layout.check_num_tokens(8, "hidden")
    many = PackedLayout.from_spans([[(1, "causal")]] * 10)
    with pytest.raises(ValueError, match=r"samples \[1, 1, 1, 1, 1, 1, 1, 1\]\.\.\."):
        many.check_num_tokens(3, "k")


# --------------------------------------------------------------------------- identity
def test_hash_and_eq_by_content():
    spans = [[(3, "full"), (2, "causal")], [(4, "noise")]]
    a = PackedLayout.from_spans(spans)
    b = PackedLayout.from_spans([list(s) for s in spans])
    assert a is not b and a == b and hash(a) == hash(b)
    assert len({a, b}) == 1 and {a: 1}[b] == 1
    different = [
        [[(3, "full"), (2, "causal")], [(4, "full")]],            # a mode
        [[(3, "full"), (2, "causal")], [(5, "noise")]],           # a length
        [[(3, "full"), (2, "causal"), (4, "noise")]],             # sample boundaries
        [[(3, "full")], [(2, "causal")], [(4, "noise")]],
    ]
    for other in different:
        c = PackedLayout.from_spans(other)
        assert c != a, other
    assert a != a.to("meta") and a.to("meta") == a.to("meta")
    assert a != spans and a != "layout"


def test_immutable():
    layout = PackedLayout.from_spans([[(3, "full"), (2, "causal")]])
    for name, value in (("num_tokens", 9), ("cu_seqlens", torch.zeros(2, dtype=torch.int32)),
                        ("spans", ()), ("device", torch.device("meta")), ("new_field", 1)):
        with pytest.raises(AttributeError):
            setattr(layout, name, value)
    assert layout.num_tokens == 5 and layout.cu_seqlens.tolist() == [0, 5]
    with pytest.raises(TypeError):
        layout.spans[0][0] = (9, 0)


@pytest.mark.parametrize("how", ["pickle", "copy", "deepcopy"])
def test_pickle_and_copy_rebuild_an_equal_layout(how):
    # DataLoader workers pickle what collate_fn returns, layouts included.
    import copy
    import pickle

    layout = PackedLayout.from_spans([[(3, "full"), (2, "causal")], [(4, "noise")]], pad_to=10)
    tiles = layout.tiles(2, 4)
    clone = {"pickle": lambda x: pickle.loads(pickle.dumps(x)), "copy": copy.copy,
             "deepcopy": copy.deepcopy}[how](layout)
    assert clone == layout and hash(clone) == hash(layout) and clone.device == layout.device
    for name in FIELDS:
        assert torch.equal(getattr(clone, name), getattr(layout, name)), name
    for name in TileMetadata.FIELDS:  # the tile cache travels too
        assert torch.equal(getattr(clone.tiles(2, 4), name), getattr(tiles, name)), name
    with pytest.raises(AttributeError):
        clone.num_tokens = 3
    meta = pickle.loads(pickle.dumps(layout.to("meta")))
    assert meta.device.type == "meta" and meta.cu_seqlens.device.type == "meta"


# --------------------------------------------------------------------------- devices
def test_to_same_device_returns_self():
    layout = PackedLayout.from_spans([[(3, "full"), (2, "causal")]])
    assert layout.to("cpu") is layout and layout.to(torch.device("cpu")) is layout


def test_to_meta_copies_everything():
    layout = PackedLayout.from_spans([[(3, "full"), (2, "causal")], [(4, "noise")]], pad_to=11)
    tiles_before = layout.tiles(4, 2)
    meta = layout.to("meta")
    assert meta is not layout and meta.device == torch.device("meta")
    for name in FIELDS:
        src, dst = getattr(layout, name), getattr(meta, name)
        assert dst.device.type == "meta", name
        assert dst.dtype == torch.int32 and dst.shape == src.shape, name
    for name in ("spans", "num_tokens", "num_samples", "num_spans", "max_seqlen", "seqlens"):
        assert getattr(meta, name) == getattr(layout, name), name
    meta_tiles = meta.tiles(4, 2)  # cached before the move: carried over, on meta
    for name in TileMetadata.FIELDS:
        assert getattr(meta_tiles, name).device.type == "meta", name
        assert getattr(meta_tiles, name).shape == getattr(tiles_before, name).shape, name
    assert layout.cu_seqlens.device.type == "cpu"  # the original is untouched
    back = meta.to("cpu")  # rebuilt from the host copy, values intact
    assert back == layout
    for name in FIELDS:
        assert torch.equal(getattr(back, name), getattr(layout, name)), name
    for name in TileMetadata.FIELDS:
        assert torch.equal(getattr(back.tiles(4, 2), name), getattr(tiles_before, name)), name
    assert meta.sample_mask(1).device.type == "meta"
    assert meta.sample_mask(1).shape == (4, 4)


# --------------------------------------------------------------------------- tiles
def tiles_oracle(mask: np.ndarray, block_q: int, block_k: int):
    """Per tile (i, j): visible = any pair visible; full = all visible, both tiles in bounds."""
    t = mask.shape[0]
    nq, nk = -(-t // block_q), -(-t // block_k)
    visible = np.zeros((nq, nk), dtype=bool)
    full = np.zeros((nq, nk), dtype=bool)
    for i in range(nq):
        for j in range(nk):
            block = mask[i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k]
            visible[i, j] = block.any()
            in_bounds = (i + 1) * block_q <= t and (j + 1) * block_k <= t
            full[i, j] = in_bounds and block.all()
    return visible, full


def _check_csr(ptr, idx, flags, visible, full, what):
    n = visible.shape[0]
    assert ptr.dtype == idx.dtype == flags.dtype == torch.int32, what
    ptr, idx, flags = ptr.tolist(), idx.tolist(), flags.tolist()
    assert len(ptr) == n + 1 and ptr[0] == 0 and ptr[-1] == len(idx) == len(flags), what
    for i in range(n):
        cols = idx[ptr[i]:ptr[i + 1]]
        want = np.flatnonzero(visible[i]).tolist()
        assert cols == want, f"{what}: row tile {i} visits {cols}, expected {want}"
        got_full = [c for c, f in zip(cols, flags[ptr[i]:ptr[i + 1]]) if f]
        want_full = np.flatnonzero(full[i]).tolist()
        assert got_full == want_full, f"{what}: row tile {i} full {got_full}, expected {want_full}"


def _tiles_available():
    try:
        from unimrg_fast.packing import tile_metadata  # noqa: F401
    except ImportError:
        return False
    return True


needs_tiles = pytest.mark.skipif(not _tiles_available(),
                                 reason="unimrg_fast.packing.tile_metadata is not written yet")


@needs_tiles
@pytest.mark.parametrize("block_q,block_k", [(1, 1), (2, 3), (4, 4), (5, 2), (8, 16), (64, 64)])
@pytest.mark.parametrize("seed", range(3))
def test_tiles_match_brute_force(seed, block_q, block_k):
    rng = np.random.default_rng(1000 + seed)
    samples = random_samples(rng, int(rng.integers(1, 6)))
    total = sum(n for s in samples for n, _ in s)
    layout = PackedLayout.from_spans(samples, pad_to=total + int(rng.integers(0, 4)))
    t = layout.num_tokens
    tiles = layout.tiles(block_q, block_k)
    assert (tiles.block_q, tiles.block_k) == (block_q, block_k)
    assert tiles.num_q_tiles == -(-t // block_q) and tiles.num_k_tiles == -(-t // block_k)
    visible, full = tiles_oracle(layout.dense_mask().numpy(), block_q, block_k)
    what = f"tiles({block_q}, {block_k}) of {layout.spans}"
    _check_csr(tiles.q_tile_ptr, tiles.k_tile_idx, tiles.k_tile_full, visible, full, what + " fwd")
    _check_csr(tiles.k_tile_ptr, tiles.q_tile_idx, tiles.q_tile_full, visible.T, full.T,
               what + " bwd")
    assert tiles.num_visible_tiles == int(visible.sum())
    assert layout.tiles(block_q, block_k) is tiles  # cached


@needs_tiles
def test_tiles_host_matches_tiles_and_copies_nothing_to_the_device(monkeypatch):
    import unimrg_fast.layout as layout_module

    meta = PackedLayout.from_spans(PICTURE_SAMPLES, pad_to=15).to("meta")
    on_cpu = PackedLayout.from_spans(PICTURE_SAMPLES, pad_to=15).tiles(2, 3)
    copies = []
    real = layout_module.arrays_to_device
    monkeypatch.setattr(layout_module, "arrays_to_device",
                        lambda arrays, device: copies.append(device) or real(arrays, device))
    host = meta.tiles_host(2, 3)
    assert copies == []  # flex's BlockMask builder wants the host arrays only
    assert meta.tiles_host(2, 3)["q_tile_ptr"] is not host["q_tile_ptr"]  # fresh read-only views
    assert not host["k_tile_idx"].flags.writeable
    for name in TileMetadata.FIELDS:
        assert host[name].dtype == np.int32, name
        assert host[name].tolist() == getattr(on_cpu, name).tolist(), name
    assert meta.tiles(2, 3).q_tile_ptr.device.type == "meta" and copies == [meta.device]


@needs_tiles
def test_tiles_of_the_picture_pack():
    # PICTURE cut into 2 x 2 tiles (F: full, P: partial, .: not visited):
    #        k0 k1 k2 k3 k4 k5
    #   q0   F  .  .  .  .  .
    #   q1   F  P  .  .  .  .      queries 2, 3: causal text after the image
    #   q2   F  F  F  .  .  .      queries 4, 5: noise, see all of sample 0
    #   q3   .  .  .  P  P  .
    #   q4   .  .  .  P  P  .
    #   q5   .  .  .  P  P  F      queries A, B: the last full image
    tiles = PackedLayout.from_spans(PICTURE_SAMPLES).tiles(2, 2)
    assert tiles.q_tile_ptr.tolist() == [0, 1, 3, 6, 8, 10, 13]
    assert tiles.k_tile_idx.tolist() == [0, 0, 1, 0, 1, 2, 3, 4, 3, 4, 3, 4, 5]
    assert tiles.k_tile_full.tolist() == [1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1]
    assert tiles.k_tile_ptr.tolist() == [0, 3, 5, 6, 9, 12, 13]
    assert tiles.q_tile_idx.tolist() == [0, 1, 2, 1, 2, 2, 3, 4, 5, 3, 4, 5, 5]
    assert tiles.q_tile_full.tolist() == [1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1]


@needs_tiles
@pytest.mark.parametrize("bad", [0, -4, 2.0, None])
def test_tiles_reject_bad_block(bad):
    layout = PackedLayout.from_spans([[(3, "full")]])
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        layout.tiles(bad, 4)
    with pytest.raises(ValueError, match="block_k must be a positive int"):
        layout.tiles(4, bad)


# --------------------------------------------------------------------------- compiled code
def test_static_argument_of_compiled_code():
    from unimrg_fast.reference.attention import packed_attention

    torch._dynamo.reset()

    def f(q, k, v, layout):
        return packed_attention(q, k, v, layout) * 2.0

    compiled = torch.compile(f, backend="aot_eager")
    # Same T and shapes, different masks: a compiled artefact reused across them would be wrong.
    spans_a = [[(3, "full"), (2, "causal"), (3, "noise")], [(4, "causal")]]
    spans_b = [[(2, "causal"), (3, "noise")], [(5, "full"), (2, "causal")]]
    a, b = PackedLayout.from_spans(spans_a), PackedLayout.from_spans(spans_b)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(12, 2, 8, generator=g)
    k, v = torch.randn(12, 1, 8, generator=g), torch.randn(12, 1, 8, generator=g)
    eager = {"a": f(q, k, v, a), "b": f(q, k, v, b)}
    assert (eager["a"] - eager["b"]).abs().max() > 0.1  # the two masks do differ
    # a, b, a again, then an equal but distinct b object.
    for name, lay in (("a", a), ("b", b), ("a", a), ("b", PackedLayout.from_spans(spans_b))):
        got = compiled(q, k, v, lay)
        torch.testing.assert_close(got, eager[name], rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"layout {name}: {m}")


def test_sample_mask_and_host_name_a_bad_argument():
    layout = PackedLayout.from_spans([[(3, "full")], [(2, "causal")]])
    for bad in (1.0, True, -1, 2):
        with pytest.raises(ValueError, match=r"sample must be in \[0, 2\)"):
            layout.sample_mask(bad)
    assert torch.equal(layout.sample_mask(np.int64(1)), layout.sample_mask(1))
    assert torch.equal(layout.sample_mask(torch.tensor(1)), layout.sample_mask(1))
    with pytest.raises(ValueError, match="name must be one of .*cu_seqlens.*, got 'nope'"):
        layout.host("nope")
