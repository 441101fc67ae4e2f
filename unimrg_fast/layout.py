"""PackedLayout: which samples and spans a pack holds, and what attention kernels need.

A pack is T tokens holding samples back to back (padding is one more causal sample).
Each sample is a run of spans; a span's mode says how its tokens attend
(DESIGN.md section 3.4):

    causal  text: a token sees earlier tokens of its sample
    full    an image whose tokens see each other (condition image, ViT image,
            masked image tokens of an AR model)
    noise   noisy target latents of a diffusion / flow sample: they see each other and
            everything before them, but nothing outside the span sees them

Query q may attend key k iff all three hold:
    1. sample(q) == sample(k)
    2. k <= q, or (span(q) == span(k) and mode(span(q)) in {full, noise})
    3. mode(span(k)) != noise, or span(q) == span(k)

The layout is built once per pack on the host (no GPU synchronisation), moved to the
device in one transfer, and shared by every layer. It is immutable and hashes by its
content, so it can be a static argument of compiled or cached code.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch

MODES = ("causal", "full", "noise")
CAUSAL, FULL, NOISE = 0, 1, 2
_MODE_IDS = {name: i for i, name in enumerate(MODES)}

# dense_mask() refuses packs above this size: a [T, T] bool mask of 16k tokens is 256 MiB.
DENSE_MASK_MAX_TOKENS = 16384


@dataclasses.dataclass(frozen=True, eq=False)
class TileMetadata:
    """Block-sparse structure of the attention mask for one tile size.

    Forward (per query tile i): key tiles k_tile_idx[q_tile_ptr[i]:q_tile_ptr[i+1]]
    (ascending) hold at least one visible pair; k_tile_full says the whole tile is
    visible and in bounds, so the kernel may skip the per-element mask.
    Backward (per key tile j): the transpose, q_tile_idx / q_tile_full.
    All tensors are int32 on the layout's device.
    """

    block_q: int
    block_k: int
    num_q_tiles: int
    num_k_tiles: int
    q_tile_ptr: torch.Tensor
    k_tile_idx: torch.Tensor
    k_tile_full: torch.Tensor
    k_tile_ptr: torch.Tensor
    q_tile_idx: torch.Tensor
    q_tile_full: torch.Tensor

    FIELDS = ("q_tile_ptr", "k_tile_idx", "k_tile_full", "k_tile_ptr", "q_tile_idx", "q_tile_full")

    @property
    def num_visible_tiles(self) -> int:
        return int(self.k_tile_idx.shape[0])


# Device arrays of a layout, in the order they sit in the single transfer buffer.
_LAYOUT_FIELDS = ("cu_seqlens", "span_bounds", "span_modes", "span_sample",
                  "token_sample", "token_span")


class PackedLayout:
    """Samples, spans and modes of one pack (see the module docstring for the rule).

    Build with `PackedLayout.from_spans([[(length, mode), ...], ...])`.

    Attributes (int32 tensors on `device`):
        cu_seqlens   [S+1]  sample boundaries
        span_bounds  [P+1]  span boundaries (span p covers [span_bounds[p], span_bounds[p+1]))
        span_modes   [P]    0 causal, 1 full, 2 noise
        span_sample  [P]    sample of each span
        token_sample [T]    sample of each token
        token_span   [T]    span of each token
    Host attributes: spans (the input, normalised), num_tokens, num_samples, num_spans,
    max_seqlen, seqlens (tuple of sample lengths).
    """

    __slots__ = ("spans", "num_tokens", "num_samples", "num_spans", "max_seqlen", "seqlens",
                 "device", "_host", "_tiles_host", "_tiles", "_masks", "_hash") + _LAYOUT_FIELDS

    # ------------------------------------------------------------------ building
    @classmethod
    def from_spans(cls, samples: Sequence[Sequence[Tuple[int, str]]], *,
                   pad_to: Optional[int] = None,
                   device: Optional[torch.device | str] = None) -> "PackedLayout":
        """Builds a layout from samples given as lists of (length, mode) spans.

        Args:
            samples: e.g. [[(1088, "full"), (40, "causal")], [(1088, "full"), (12, "causal"),
                (1024, "noise")]]. Lengths >= 1; modes "causal", "full", "noise".
            pad_to: if given, a causal padding sample fills the pack up to this many tokens.
            device: where the tensors live (default CPU).
        """
        spans = _normalise(samples)
        total = sum(length for sample in spans for length, _ in sample)
        if pad_to is not None:
            if isinstance(pad_to, bool) or not isinstance(pad_to, (int, np.integer)):
                raise TypeError(f"pad_to must be an int, got {type(pad_to).__name__}")
            pad_to = int(pad_to)   # a numpy int, as the span lengths may be
            if pad_to < total:
                raise ValueError(f"pad_to={pad_to} is smaller than the samples' {total} tokens")
            if pad_to > total:
                spans = spans + (((pad_to - total, CAUSAL),),)
        layout = cls.__new__(cls)
        layout._init_host(spans)
        layout._place(_canonical_device("cpu" if device is None else device), None)
        return layout

    def _init_host(self, spans: Tuple[Tuple[Tuple[int, int], ...], ...]) -> None:
        lengths = np.array([length for sample in spans for length, _ in sample], dtype=np.int64)
        modes = np.array([mode for sample in spans for _, mode in sample], dtype=np.int32)
        span_sample = np.repeat(np.arange(len(spans), dtype=np.int32),
                                [len(sample) for sample in spans])
        seqlens = np.array([sum(length for length, _ in sample) for sample in spans], dtype=np.int64)
        num_tokens = int(lengths.sum())
        if num_tokens >= 2 ** 31:
            raise ValueError(f"a pack holds at most 2**31 - 1 tokens, got {num_tokens}")
        host = {
            "cu_seqlens": np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32),
            "span_bounds": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
            "span_modes": modes,
            "span_sample": span_sample,
            "token_sample": np.repeat(np.arange(len(spans), dtype=np.int32), seqlens),
            "token_span": np.repeat(np.arange(len(lengths), dtype=np.int32), lengths),
        }
        self.spans = spans
        self.num_tokens = num_tokens
        self.num_samples = len(spans)
        self.num_spans = int(lengths.shape[0])
        self.seqlens = tuple(int(n) for n in seqlens)
        self.max_seqlen = max(self.seqlens)
        self._host = host
        self._tiles_host: Dict[Tuple[int, int], Tuple[np.ndarray, ...]] = {}
        self._hash = hash(spans)

    def _place(self, device: torch.device, tiles_host) -> None:
        """Copies every host array (and cached tile metadata) to `device` in ONE transfer."""
        if tiles_host is not None:
            self._tiles_host = dict(tiles_host)
        arrays = [self._host[name] for name in _LAYOUT_FIELDS]
        tile_keys = sorted(self._tiles_host)
        for key in tile_keys:
            arrays.extend(self._tiles_host[key])
        parts = arrays_to_device(arrays, device)
        for name, part in zip(_LAYOUT_FIELDS, parts):
            object.__setattr__(self, name, part)
        self._tiles = {}
        for n, key in enumerate(tile_keys):
            chunk = parts[len(_LAYOUT_FIELDS) + 6 * n: len(_LAYOUT_FIELDS) + 6 * (n + 1)]
            self._tiles[key] = _tile_metadata_from(key, self.num_tokens, chunk)
        self._masks = None
        object.__setattr__(self, "device", device)

    def to(self, device: torch.device | str) -> "PackedLayout":
        """A copy of this layout (and its cached tile metadata) on `device`."""
        device = _canonical_device(device)
        if device == self.device:
            return self
        other = PackedLayout.__new__(PackedLayout)
        for name in ("spans", "num_tokens", "num_samples", "num_spans", "max_seqlen", "seqlens",
                     "_host", "_hash"):
            object.__setattr__(other, name, getattr(self, name))
        other._place(device, self._tiles_host)
        return other

    def __setattr__(self, name, value):
        if hasattr(self, "_hash") and name not in ("_tiles", "_tiles_host", "_masks"):
            raise AttributeError("PackedLayout is immutable; build a new one with from_spans")
        object.__setattr__(self, name, value)

    def __reduce__(self):
        # pickle (a DataLoader worker returning a layout from collate_fn), copy and deepcopy
        # would restore slot by slot, which __setattr__ refuses: rebuild from the spans.
        return (_rebuild, (self.spans, str(self.device), self._tiles_host))

    # ------------------------------------------------------------- identity
    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return (isinstance(other, PackedLayout) and self.spans == other.spans
                and self.device == other.device)

    def __repr__(self) -> str:
        mode_tokens = np.bincount(self._host["span_modes"],
                                  weights=np.diff(self._host["span_bounds"]), minlength=3)
        counts = ", ".join(f"{name}={int(n)}" for name, n in zip(MODES, mode_tokens))
        return (f"PackedLayout(num_tokens={self.num_tokens}, num_samples={self.num_samples}, "
                f"num_spans={self.num_spans}, {counts}, device={self.device})")

    # ------------------------------------------------------------- queries
    def host(self, name: str) -> np.ndarray:
        """A read-only host (numpy) copy of one of the int32 arrays, without any sync."""
        if name not in self._host:
            raise ValueError(f"name must be one of {', '.join(sorted(self._host))}, got {name!r}")
        array = self._host[name].view()
        array.flags.writeable = False
        return array

    def tiles_host(self, block_q: int, block_k: int) -> Dict[str, np.ndarray]:
        """The host (numpy, int32, read-only) twins of `tiles(block_q, block_k)`'s arrays,
        by TileMetadata.FIELDS name: computed on the host (and cached) without copying
        anything to the device."""
        out = {}
        for name, array in zip(TileMetadata.FIELDS, self._host_tiles(block_q, block_k)):
            out[name] = array.view()
            out[name].flags.writeable = False
        return out

    def check_num_tokens(self, n: int, name: str) -> None:
        """Raises ValueError when a tensor's token dimension does not match the pack."""
        if n != self.num_tokens:
            raise ValueError(f"{name} has {n} tokens but the layout holds {self.num_tokens} "
                             f"(samples {list(self.seqlens)[:8]}{'...' if self.num_samples > 8 else ''})")

    def attended_pairs(self, samples: Optional[int] = None) -> int:
        """Exact number of (query, key) pairs the rule allows, over the first `samples`
        samples (default: all of them; a padded pack's padding is its last sample), from
        the spans alone: a query of a span sees every earlier non-noise span of its sample,
        plus its own span (all of it when full / noise, up to itself when causal). The
        useful work of attention, for FLOP counts."""
        total = 0
        for sample in self.spans[:samples]:
            visible_before = 0
            for length, mode in sample:
                own = length * (length + 1) // 2 if mode == CAUSAL else length * length
                total += length * visible_before + own
                if mode != NOISE:
                    visible_before += length
        return total

    def dense_mask(self, device: Optional[torch.device | str] = None) -> torch.Tensor:
        """[T, T] bool, True where query (row) may attend key (column). Small packs only."""
        if self.num_tokens > DENSE_MASK_MAX_TOKENS:
            raise ValueError(f"dense_mask() builds a [T, T] tensor; T = {self.num_tokens} exceeds "
                             f"{DENSE_MASK_MAX_TOKENS}. Use sample_mask(s) or tiles() instead.")
        return self._mask(0, self.num_tokens, device)

    def sample_mask(self, sample: int, device: Optional[torch.device | str] = None) -> torch.Tensor:
        """[L, L] bool mask of one sample (L its length): what per-sample attention needs."""
        try:   # an int, a numpy int or a 0-d integer tensor; not a bool or a float
            index = None if isinstance(sample, bool) else operator.index(sample)
        except TypeError:
            index = None
        if index is None or not 0 <= index < self.num_samples:
            raise ValueError(f"sample must be in [0, {self.num_samples}), got {sample!r}")
        sample = index
        start, end = (int(x) for x in self._host["cu_seqlens"][sample: sample + 2])
        return self._mask(start, end, device)

    def sample_masks(self) -> Tuple[torch.Tensor, ...]:
        """Every sample's [L, L] bool mask (sample_mask(s)) on the layout's device, built
        on first use and cached on the layout: per-sample attention reads them at every
        layer without building or copying anything. The tensors are the cache: read only."""
        if self._masks is None:
            bounds = [int(x) for x in self._host["cu_seqlens"]]
            self._masks = tuple(self._mask(bounds[s], bounds[s + 1], None)
                                for s in range(self.num_samples))
        return self._masks

    def _mask(self, start: int, end: int, device) -> torch.Tensor:
        device = self.device if device is None else _canonical_device(device)
        if device == self.device:
            # From the ids already on the device: no host->device copy, which from
            # pageable memory would wait for the GPU.
            span = self.token_span[start:end].long()
            sample = self.token_sample[start:end]
            modes = self.span_modes.long()[span]
        else:
            span = torch.from_numpy(self._host["token_span"][start:end].astype(np.int64)).to(device)
            sample = torch.from_numpy(self._host["token_sample"][start:end]).to(device)
            modes = torch.from_numpy(self._host["span_modes"].astype(np.int64)).to(device)[span]
        pos = torch.arange(end - start, device=device)
        same_span = span[:, None] == span[None, :]
        visible = sample[:, None] == sample[None, :]
        visible &= (pos[None, :] <= pos[:, None]) | (same_span & (modes[:, None] != CAUSAL))
        visible &= (modes[None, :] != NOISE) | same_span
        return visible

    def tiles(self, block_q: int, block_k: int) -> TileMetadata:
        """Tile metadata for (block_q, block_k), computed on the host once and cached."""
        key = (block_q, block_k)
        if key not in self._tiles:
            parts = arrays_to_device(self._host_tiles(block_q, block_k), self.device)
            self._tiles[key] = _tile_metadata_from(key, self.num_tokens, parts)
        return self._tiles[key]

    def _host_tiles(self, block_q: int, block_k: int) -> Tuple[np.ndarray, ...]:
        """The int32 host arrays of the tile metadata, in TileMetadata.FIELDS order, cached."""
        for name, value in (("block_q", block_q), ("block_k", block_k)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        key = (block_q, block_k)
        if key not in self._tiles_host:
            from unimrg_fast.packing import tile_metadata

            h = self._host
            arrays = tile_metadata(h["cu_seqlens"], h["span_bounds"], h["span_modes"],
                                   h["span_sample"], block_q, block_k)
            self._tiles_host[key] = tuple(np.ascontiguousarray(a, dtype=np.int32) for a in arrays)
        return self._tiles_host[key]


def arrays_to_device(arrays, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """Host int32 arrays as 1-D tensors on `device`, in ONE transfer: concatenated, pinned
    and copied without making the host wait (a CUDA device), then split."""
    flat = torch.from_numpy(np.concatenate([np.asarray(a, dtype=np.int32).reshape(-1)
                                            for a in arrays]))
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        flat = flat.to(device)
    return torch.split(flat, [int(np.size(a)) for a in arrays])


def _rebuild(spans, device: str, tiles_host) -> PackedLayout:
    layout = PackedLayout.__new__(PackedLayout)
    layout._init_host(spans)
    layout._place(_canonical_device(device), tiles_host)
    return layout


def _canonical_device(device) -> torch.device:
    # Tensors on "cuda" report "cuda:N"; the layout must too, or device checks and
    # __eq__ would tell apart the same GPU spelled two ways.
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _tile_metadata_from(key: Tuple[int, int], num_tokens: int, parts) -> TileMetadata:
    block_q, block_k = key
    return TileMetadata(block_q, block_k, -(-num_tokens // block_q), -(-num_tokens // block_k),
                        **dict(zip(TileMetadata.FIELDS, parts)))


def _normalise(samples) -> Tuple[Tuple[Tuple[int, int], ...], ...]:
    """Validates the from_spans input and turns modes into ids; errors name sample/span."""
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Iterable):
        raise TypeError("samples must be a list of samples, each a list of (length, mode) spans")
    out = []
    for s, sample in enumerate(samples):
        if isinstance(sample, (str, bytes)) or not isinstance(sample, Iterable):
            raise TypeError(f"sample {s} must be a list of (length, mode) spans, got {sample!r}")
        spans = []
        for p, span in enumerate(sample):
            try:
                length, mode = span
            except (TypeError, ValueError):
                raise TypeError(f"sample {s}, span {p}: expected a (length, mode) pair, "
                                f"got {span!r}") from None
            if isinstance(length, bool) or not isinstance(length, (int, np.integer)):
                raise TypeError(f"sample {s}, span {p}: length must be an int, got {length!r}")
            if length < 1:
                raise ValueError(f"sample {s}, span {p}: length must be >= 1, got {length}")
            if not isinstance(mode, str) or mode not in _MODE_IDS:
                raise ValueError(f"sample {s}, span {p}: unknown mode {mode!r}; "
                                 f"expected one of {', '.join(MODES)}")
            spans.append((int(length), _MODE_IDS[mode]))
        if not spans:
            raise ValueError(f"sample {s} is empty: every sample needs at least one span")
        out.append(tuple(spans))
    if not out:
        raise ValueError("samples is empty: a pack needs at least one sample")
    return tuple(out)
