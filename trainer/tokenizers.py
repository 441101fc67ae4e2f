"""Tokenizers that need no download: words, continuous patch latents, k-means image codes.

- WordTokenizer: the synthetic language of trainer.scenes, one id per word.
- PatchLatents: continuous image tokens for the `mar` / `flow` families, standing in for a
  VAE: p x p patches of the [-1, 1] image, optionally rotated/projected by a fixed
  orthonormal matrix.
- KMeansCodebook: discrete image tokens for the `ar` family, standing in for a VQ model:
  k-means over p x p patches, fitted on the synthetic scenes themselves.

Images are channels-last, [B, S, S, 3], uint8 in [0, 255] or float in [-1, 1].
Tokens are in row-major patch order; each token flattens its patch as (row, col, channel).
"""
from __future__ import annotations

import re

import numpy as np
import torch

from trainer import scenes

# ------------------------------------------------------------------------------------ text
# Words, the special tokens, and punctuation split off words ("image." -> "image", ".").
TOKEN_PATTERN = re.compile(r"<[a-z]+>|\w+|[^\w\s]")


class WordTokenizer:
    """Word-level tokenizer over the synthetic language: a fixed vocabulary built from
    every word scenes/questions/prompts/answers can produce, so it needs no download and
    is the same on every machine.

    Ids: the four special tokens first (pad = 0, bos, eos, img), then the words sorted.
    `encode` adds no special tokens: the packer decides where BOS / EOS / image spans go.
    """
    PAD, BOS, EOS, IMG = "<pad>", "<bos>", "<eos>", "<img>"

    def __init__(self) -> None:
        self.specials = (self.PAD, self.BOS, self.EOS, self.IMG)
        self.id_to_word: tuple[str, ...] = self.specials + tuple(scenes.vocabulary_words())
        self.word_to_id = {word: i for i, word in enumerate(self.id_to_word)}
        self.vocab_size = len(self.id_to_word)
        self.pad_id, self.bos_id, self.eos_id, self.img_id = (
            self.word_to_id[token] for token in self.specials)

    def __len__(self) -> int:
        return self.vocab_size

    def tokenize(self, text: str) -> list[str]:
        """Lower-cased words and punctuation; canonical scene text is already this, spaced."""
        return TOKEN_PATTERN.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = []
        for word in self.tokenize(text):
            if word not in self.word_to_id:
                raise ValueError(f"unknown word {word!r} in text {text!r}: WordTokenizer knows "
                                 f"only the synthetic language of trainer.scenes")
            ids.append(self.word_to_id[word])
        return ids

    def decode(self, ids, *, skip_special: bool = True) -> str:
        """Words joined by single spaces; special tokens dropped unless skip_special=False."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
        words = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids holds {i}, outside [0, {self.vocab_size})")
            if skip_special and i < len(self.specials):
                continue
            words.append(self.id_to_word[i])
        return " ".join(words)


# ---------------------------------------------------------------------------------- images
def image_to_unit(image_uint8: np.ndarray) -> np.ndarray:
    """uint8 [..., S, S, 3] in [0, 255] -> float32 in [-1, 1] (DESIGN.md 6)."""
    image = np.asarray(image_uint8)
    if image.dtype != np.uint8:
        raise ValueError(f"image_uint8 must be uint8, got {image.dtype}")
    if image.ndim < 3 or image.shape[-1] != 3:
        raise ValueError(f"image_uint8 must be [..., S, S, 3], got shape {image.shape}")
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def depth_to_image(depth: np.ndarray) -> np.ndarray:
    """Depth in [0, 1] [..., S, S] -> uint8 grey [..., S, S, 3] (DESIGN.md 6).

    As UniMRG feeds it: image_to_unit of this is the depth in [-1, 1] on 3 channels."""
    depth = np.asarray(depth)
    if depth.ndim < 2 or not np.issubdtype(depth.dtype, np.floating):
        raise ValueError(f"depth must be a float array [..., S, S], got {depth.dtype} "
                         f"{depth.shape}")
    grey = np.rint(np.clip(depth, 0.0, 1.0) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def as_unit_tensor(images, image_size: int, name: str = "images") -> torch.Tensor:
    """[B, S, S, 3] uint8 (-> [-1, 1]) or float (taken as [-1, 1]) -> float32 tensor.

    A tensor keeps its device; a numpy array becomes a CPU tensor.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got "
                         f"{type(images).__name__}")
    if images.dim() != 4 or images.shape[1:] != (image_size, image_size, 3):
        raise ValueError(f"{name} must be [B, {image_size}, {image_size}, 3], got shape "
                         f"{tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    if not images.is_floating_point():
        raise ValueError(f"{name} must be uint8 or floating point, got {images.dtype}")
    return images.float()


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, S, S, 3] -> [B, (S/p)^2, p*p*3], row-major patches."""
    b, s, _, c = images.shape
    n = s // patch
    x = images.reshape(b, n, patch, n, patch, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, n * n, patch * patch * c)


def unpatchify(tokens: torch.Tensor, patch: int, image_size: int) -> torch.Tensor:
    """[B, (S/p)^2, p*p*3] -> [B, S, S, 3]: the inverse of patchify."""
    b = tokens.shape[0]
    n = image_size // patch
    x = tokens.reshape(b, n, n, patch, patch, 3).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, image_size, image_size, 3)


def validate_geometry(image_size: int, patch: int) -> None:
    if not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch must be a positive int, got {patch!r}")
    if not isinstance(image_size, int) or image_size < 1 or image_size % patch:
        raise ValueError(f"image_size must be a positive int divisible by patch={patch}, "
                         f"got {image_size!r}")


def orthonormal_columns(rows: int, cols: int, seed: int) -> torch.Tensor:
    """float32 [rows, cols] with orthonormal columns, the same for a seed on every machine."""
    gaussian = np.random.default_rng(seed).standard_normal((rows, cols))
    q, r = np.linalg.qr(gaussian)
    # Fix the signs QR leaves free, so the matrix depends only on the Gaussian draw.
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)
    return torch.from_numpy(q.astype(np.float32))


class PatchLatents:
    """Continuous image tokens without a VAE: non-overlapping p x p patches of the
    [-1, 1] image, flattened (C = p*p*3), optionally projected to `channels` dims by a
    fixed orthonormal matrix drawn from `seed` (so the inverse is the transpose).

    With channels < p*p*3 the decode is the least-squares reconstruction (lossy); with
    channels == p*p*3 it is a rotation and decode(encode(x)) == x up to float rounding.
    """

    def __init__(self, image_size: int = 32, patch: int = 4, channels: int | None = None,
                 seed: int = 0):
        validate_geometry(image_size, patch)
        patch_dim = patch * patch * 3
        if channels is not None and not (isinstance(channels, int) and 1 <= channels <= patch_dim):
            raise ValueError(f"channels must be None or an int in [1, {patch_dim}] "
                             f"(patch * patch * 3), got {channels!r}")
        self.image_size, self.patch, self.seed = image_size, patch, seed
        self.num_tokens = (image_size // patch) ** 2
        self.channels = patch_dim if channels is None else channels
        # None: the identity, so encode is patchify exactly (no matmul rounding).
        self.projection = None if channels is None else orthonormal_columns(
            patch_dim, channels, seed)

    def encode(self, images) -> torch.Tensor:
        """uint8 [B, S, S, 3] (or float in [-1, 1]) -> float32 [B, L, C]."""
        tokens = patchify(as_unit_tensor(images, self.image_size), self.patch)
        if self.projection is None:
            return tokens.contiguous()
        return tokens @ self.projection.to(tokens.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, L, C] -> float32 [B, S, S, 3] in [-1, 1] (clamped)."""
        if not isinstance(latents, torch.Tensor) or latents.dim() != 3 or \
                latents.shape[1:] != (self.num_tokens, self.channels):
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents)
            raise ValueError(f"latents must be a tensor [B, {self.num_tokens}, "
                             f"{self.channels}], got {shape}")
        tokens = latents.float()
        if self.projection is not None:
            tokens = tokens @ self.projection.to(tokens.device).T
        return unpatchify(tokens, self.patch, self.image_size).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------- k-means
def unique_patches(images: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct uint8 patches and their counts: synthetic scenes repeat many patches
    (flat colours, black masks), and weighted k-means over the distinct ones is faster
    and gives duplicated points no chance to become duplicate centroids."""
    patches = patchify(torch.from_numpy(np.ascontiguousarray(images)), patch)
    patches = patches.reshape(-1, patch * patch * 3)
    distinct, counts = np.unique(patches.numpy(), axis=0, return_counts=True)
    return distinct.astype(np.float64) / 127.5 - 1.0, counts.astype(np.float64)


def squared_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    d = ((points * points).sum(1)[:, None] - 2.0 * points @ centroids.T
         + (centroids * centroids).sum(1)[None, :])
    return np.maximum(d, 0.0)


def kmeans_plus_plus(points, weights, num_codes, rng) -> np.ndarray:
    """k-means++ seeding: each next centre drawn with probability ~ weight * distance^2."""
    centres = [points[rng.choice(len(points), p=weights / weights.sum())]]
    closest = squared_distances(points, centres[0][None])[:, 0]
    for _ in range(1, num_codes):
        mass = weights * closest
        if mass.sum() <= 0:  # fewer distinct patches than codes: repeat the last centre
            centres.append(centres[-1])
            continue
        centres.append(points[rng.choice(len(points), p=mass / mass.sum())])
        closest = np.minimum(closest, squared_distances(points, centres[-1][None])[:, 0])
    return np.stack(centres)


def lloyd(points, weights, centroids, iters: int) -> np.ndarray:
    """Weighted Lloyd iterations; an emptied cluster moves to the worst-served point."""
    for _ in range(iters):
        distances = squared_distances(points, centroids)
        assign = distances.argmin(1)
        mass = np.bincount(assign, weights, minlength=len(centroids))
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, points * weights[:, None])
        updated = centroids.copy()
        filled = mass > 0
        updated[filled] = sums[filled] / mass[filled, None]
        worst = np.argsort(-distances[np.arange(len(points)), assign] * weights, kind="stable")
        for k, point in zip(np.flatnonzero(~filled), worst):
            updated[k] = points[point]
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    return centroids


def scene_training_images(num_scenes: int, image_size: int, seed: int) -> np.ndarray:
    """Everything the `ar` family generates: the image, its depth map, both seg targets."""
    images = []
    for i in range(num_scenes):
        scene = scenes.make_scene(seed * 1_000_003 + i, image_size)
        images += [scene.image, depth_to_image(scene.depth), scene.seg_edges,
                   scene.seg_colour]
    return np.stack(images)


class KMeansCodebook:
    """Discrete image tokens for the `ar` family: k-means over p x p patches (in [-1, 1])
    fitted once on images drawn from the synthetic scene generator (deterministic by
    seed), instead of a downloaded VQ model.

    The default fit draws `num_scenes` scenes and uses all four renderings of each (image,
    depth as grey, segmentation edges, coloured instances), since all four are targets.
    """

    def __init__(self, num_codes: int = 64, image_size: int = 32, patch: int = 4,
                 seed: int = 0, *, num_scenes: int = 64, iters: int = 20):
        validate_geometry(image_size, patch)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        images = scene_training_images(num_scenes, image_size, seed)
        fitted = self.fit(images, num_codes, patch=patch, iters=iters, seed=seed)
        self._adopt(fitted.codes, image_size, patch)

    def _adopt(self, codes: torch.Tensor, image_size: int, patch: int) -> None:
        validate_geometry(image_size, patch)
        patch_dim = patch * patch * 3
        if codes.dim() != 2 or codes.shape[1] != patch_dim or codes.shape[0] < 1:
            raise ValueError(f"codes must be [num_codes, {patch_dim}], got "
                             f"{tuple(codes.shape)}")
        self.codes = codes.float().contiguous()
        self.num_codes = codes.shape[0]
        self.image_size, self.patch = image_size, patch
        self.num_tokens = (image_size // patch) ** 2

    @classmethod
    def _from_codes(cls, codes: torch.Tensor, image_size: int, patch: int) -> "KMeansCodebook":
        book = cls.__new__(cls)
        book._adopt(codes, image_size, patch)
        return book

    @classmethod
    def fit(cls, images: np.ndarray, num_codes: int, *, patch: int = 4, iters: int = 20,
            seed: int = 0) -> "KMeansCodebook":
        """k-means++ then weighted Lloyd over the distinct patches of uint8 [B, S, S, 3]."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or \
                images.shape[1] != images.shape[2] or images.shape[0] < 1:
            raise ValueError(f"images must be uint8 [B, S, S, 3], got {images.dtype} "
                             f"{images.shape}")
        validate_geometry(images.shape[1], patch)
        if not isinstance(num_codes, int) or num_codes < 1:
            raise ValueError(f"num_codes must be a positive int, got {num_codes!r}")
        if not isinstance(iters, int) or iters < 0:
            raise ValueError(f"iters must be a non-negative int, got {iters!r}")
        points, weights = unique_patches(images, patch)
        rng = np.random.default_rng(seed)
        centroids = lloyd(points, weights, kmeans_plus_plus(points, weights, num_codes, rng),
                          iters)
        return cls._from_codes(torch.from_numpy(centroids.astype(np.float32)),
                               images.shape[1], patch)

    def encode(self, images) -> torch.Tensor:
        """uint8 [B, S, S, 3] (or float in [-1, 1]) -> int64 [B, L]: nearest code per patch."""
        tokens = patchify(as_unit_tensor(images, self.image_size), self.patch)
        codes = self.codes.to(tokens.device)
        # ||x||^2 is the same for every code, so it does not change the argmin.
        scores = tokens @ codes.T * -2.0 + (codes * codes).sum(1)
        return scores.argmin(-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 [B, L] -> float32 [B, S, S, 3] in [-1, 1]."""
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or \
                codes.shape[1] != self.num_tokens or codes.is_floating_point():
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes)
            raise ValueError(f"codes must be an integer tensor [B, {self.num_tokens}], got "
                             f"{shape}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(f"codes must lie in [0, {self.num_codes}), got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        tokens = self.codes.to(codes.device)[codes.long()]
        return unpatchify(tokens, self.patch, self.image_size)

    def state_dict(self) -> dict:
        return {"codes": self.codes.clone(), "image_size": self.image_size,
                "patch": self.patch}

    @classmethod
    def from_state_dict(cls, state) -> "KMeansCodebook":
        missing = {"codes", "image_size", "patch"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        return cls._from_codes(torch.as_tensor(state["codes"]), int(state["image_size"]),
                               int(state["patch"]))


class VAELatents:
    """Continuous image tokens from a local diffusers AutoencoderKL (the VAE of a real
    MAR / flow model): the posterior mean, scaled like the diffusion models that use it,
    one token per latent pixel. Same interface as PatchLatents."""

    def __init__(self, path: str, image_size: int):
        try:
            from diffusers import AutoencoderKL
        except ImportError as exc:
            raise ValueError("a VAE image tokenizer needs diffusers: pip install diffusers") from exc
        self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True).eval()
        self.vae.requires_grad_(False)
        cfg = self.vae.config
        self.image_size = image_size
        self.patch = 2 ** (len(cfg.block_out_channels) - 1)  # the VAE's downsampling factor
        # Not refused here: the trainer compares --patch with self.patch first, naming the
        # flag to change (a loading error would blame --image-tokenizer, which loaded fine);
        # encode / decode refuse a size the factor does not divide.
        self.channels = int(cfg.latent_channels)
        self.num_tokens = (image_size // self.patch) ** 2
        self.scale = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)

    def _check_size(self) -> None:
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the VAE's "
                             f"downsampling factor {self.patch}")

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        self._check_size()
        x = as_unit_tensor(images, self.image_size).permute(0, 3, 1, 2)   # [B, 3, S, S]
        z = (self.vae.encode(x).latent_dist.mean - self.shift) * self.scale  # [B, C, h, w]
        return z.flatten(2).transpose(1, 2).contiguous()                   # [B, h*w, C]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_size()
        side = self.image_size // self.patch
        z = latents.transpose(1, 2).reshape(latents.shape[0], self.channels, side, side)
        x = self.vae.decode(z / self.scale + self.shift).sample               # [B, 3, S, S]
        return x.clamp(-1, 1).permute(0, 2, 3, 1).contiguous()
