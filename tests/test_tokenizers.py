"""trainer.tokenizers: words, patch latents and k-means codes, checked from their definitions."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from trainer.scenes import PROMPTS, make_questions, make_scene
from trainer.tokenizers import (KMeansCodebook, PatchLatents, WordTokenizer, depth_to_image,
                                image_to_unit)


def scene_images(first_seed: int, count: int, size: int = 32) -> np.ndarray:
    return np.stack([make_scene(first_seed + i, size).image for i in range(count)])


def random_images(count: int, size: int = 32) -> np.ndarray:
    return torch.randint(0, 256, (count, size, size, 3), dtype=torch.uint8).numpy()


def patch_of(unit: np.ndarray, b: int, token: int, patch: int) -> np.ndarray:
    """Token `token` of image b by definition: row-major patch, flattened (row, col, c)."""
    per_row = unit.shape[1] // patch
    r, c = divmod(token, per_row)
    return unit[b, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].reshape(-1)


# -------------------------------------------------------------------------------- words
def test_vocabulary_is_fixed_and_sorted():
    a, b = WordTokenizer(), WordTokenizer()
    assert a.id_to_word == b.id_to_word and a.vocab_size == len(a.id_to_word) == len(a)
    assert (a.pad_id, a.bos_id, a.eos_id, a.img_id) == (0, 1, 2, 3)
    assert a.id_to_word[:4] == ("<pad>", "<bos>", "<eos>", "<img>")
    words = list(a.id_to_word[4:])
    assert words == sorted(words) and len(set(words)) == len(words)


def test_every_text_round_trips(seed):
    tok = WordTokenizer()
    texts = [p for paraphrases in PROMPTS.values() for p in paraphrases]
    for s in range(seed % 10_000, seed % 10_000 + 60):
        for qa in make_questions(make_scene(s), s, k=3):
            texts += [qa.question, qa.answer]
    for text in texts:
        ids = tok.encode(text)
        assert all(4 <= i < tok.vocab_size for i in ids), text
        assert tok.decode(ids) == text
    question = make_questions(make_scene(seed % 1000), seed)[0].question
    assert tok.encode(question)[-1] == tok.word_to_id["?"]


def test_encode_normalises_case_and_punctuation():
    tok = WordTokenizer()
    assert tok.encode("Generate the depth map of this image.") == \
        tok.encode("generate the depth map of this image .")
    assert tok.encode("<bos> red circle <eos>") == \
        [tok.bos_id, tok.word_to_id["red"], tok.word_to_id["circle"], tok.eos_id]
    assert tok.encode("") == []


def test_decode_specials_and_types():
    tok = WordTokenizer()
    ids = [tok.bos_id, *tok.encode("two"), tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(ids) == "two"
    assert tok.decode(ids, skip_special=False) == "<bos> two <eos> <pad> <pad>"
    assert tok.decode(torch.tensor(ids)) == "two" == tok.decode(np.array(ids))
    assert tok.decode([]) == ""


def test_word_errors():
    tok = WordTokenizer()
    with pytest.raises(ValueError, match="'hexagon'"):
        tok.encode("how many hexagons are there ?".replace("hexagons", "hexagon"))
    with pytest.raises(ValueError, match="ids"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="ids"):
        tok.decode([-1])


# ------------------------------------------------------------------------------- images
def test_image_to_unit():
    image = np.array([[[0, 255, 127]]], np.uint8).repeat(2, 0).repeat(2, 1)
    unit = image_to_unit(image)
    assert unit.dtype == np.float32 and unit.shape == image.shape
    np.testing.assert_allclose(unit[0, 0], [-1.0, 1.0, 127 / 127.5 - 1], atol=1e-7)
    batch = random_images(3, 8)
    np.testing.assert_allclose(image_to_unit(batch), batch / 127.5 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="image_uint8"):
        image_to_unit(batch.astype(np.float32))
    with pytest.raises(ValueError, match="image_uint8"):
        image_to_unit(batch[..., :2])


def test_depth_to_image(seed):
    depth = make_scene(seed % 1000).depth
    grey = depth_to_image(depth)
    assert grey.dtype == np.uint8 and grey.shape == depth.shape + (3,)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 0] == grey[..., 2]).all()
    np.testing.assert_array_equal(grey[..., 0], np.rint(depth * 255))
    assert grey.max() == 255 and grey.min() == 0
    with pytest.raises(ValueError, match="depth"):
        depth_to_image((depth * 255).astype(np.uint8))


# ------------------------------------------------------------------------ patch latents
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_patch_latents_are_patches_and_round_trip_exactly(patch):
    images = random_images(2)
    latents = PatchLatents(32, patch)
    tokens = latents.encode(images)
    assert tokens.dtype == torch.float32
    assert tokens.shape == (2, latents.num_tokens, latents.channels) == \
        (2, (32 // patch) ** 2, patch * patch * 3)
    unit = image_to_unit(images)
    for b, token in [(0, 0), (1, 5), (1, latents.num_tokens - 1)]:
        np.testing.assert_array_equal(tokens[b, token].numpy(), patch_of(unit, b, token, patch))
    assert torch.equal(latents.decode(tokens), torch.from_numpy(unit))
    # Float input in [-1, 1] is taken as is.
    assert torch.equal(latents.encode(torch.from_numpy(unit)), tokens)


def test_full_rank_projection_is_a_rotation(seed):
    images = random_images(3)
    plain, rotated = PatchLatents(32, 4), PatchLatents(32, 4, channels=48, seed=seed % 1000)
    x, z = plain.encode(images), rotated.encode(images)
    torch.testing.assert_close(z.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(z, x), "a rotation by a random matrix should move the tokens"
    torch.testing.assert_close(rotated.decode(z), torch.from_numpy(image_to_unit(images)),
                               rtol=0, atol=1e-5)


def test_low_rank_projection(seed):
    latents = PatchLatents(32, 4, channels=16, seed=seed % 1000)
    q = latents.projection
    torch.testing.assert_close(q.T @ q, torch.eye(16), rtol=0, atol=1e-5)
    images = random_images(2)
    z = latents.encode(images)
    assert z.shape == (2, 64, 16) and latents.channels == 16
    # Decode is the transpose: re-encoding the decoded image gives the same latents
    # (up to the clamp, which random images barely reach after a projection).
    torch.testing.assert_close(latents.decode(z), (PatchLatents(32, 4).encode(images) @ q @ q.T)
                               .reshape(2, 8, 8, 4, 4, 3).permute(0, 1, 3, 2, 4, 5)
                               .reshape(2, 32, 32, 3).clamp(-1, 1), rtol=0, atol=1e-5)
    assert latents.decode(z * 10).abs().max() <= 1.0
    same = PatchLatents(32, 4, channels=16, seed=seed % 1000)
    other = PatchLatents(32, 4, channels=16, seed=seed % 1000 + 1)
    assert torch.equal(same.projection, q) and not torch.allclose(other.projection, q)


def test_patch_latents_errors():
    with pytest.raises(ValueError, match="image_size"):
        PatchLatents(30, 4)
    with pytest.raises(ValueError, match="channels"):
        PatchLatents(32, 4, channels=49)
    latents = PatchLatents(32, 4)
    with pytest.raises(ValueError, match="images"):
        latents.encode(random_images(1, 16))
    with pytest.raises(ValueError, match="images"):
        latents.encode(random_images(1)[0])
    with pytest.raises(ValueError, match="images"):
        latents.encode(torch.zeros(1, 32, 32, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="latents"):
        latents.decode(torch.zeros(1, 64, 16))


# ------------------------------------------------------------------------------ k-means
@pytest.fixture(scope="module")
def training_images():
    return scene_images(0, 256)


def reconstruction_error(book, images):
    unit = torch.from_numpy(image_to_unit(images))
    return float(((book.decode(book.encode(images)) - unit) ** 2).mean())


def test_kmeans_codes_and_reconstruction(training_images):
    book = KMeansCodebook.fit(training_images, 32, seed=0)
    assert book.codes.shape == (32, 48) and book.num_codes == 32 and book.num_tokens == 64
    held_out = scene_images(10_000, 16)
    codes = book.encode(held_out)
    assert codes.dtype == torch.int64 and codes.shape == (16, 64)
    assert 0 <= codes.min() and codes.max() < 32
    assert len(torch.unique(codes)) > 4, "a fitted codebook should use several codes"
    decoded = book.decode(codes)
    assert decoded.dtype == torch.float32 and decoded.shape == (16, 32, 32, 3)
    # One code is the mean patch; 32 codes must do clearly better on unseen scenes.
    single = KMeansCodebook.fit(training_images, 1, seed=0)
    mean_patch = image_to_unit(training_images).reshape(256, 8, 4, 8, 4, 3) \
        .transpose(0, 1, 3, 2, 4, 5).reshape(-1, 48).astype(np.float64).mean(0)
    np.testing.assert_allclose(single.codes[0].numpy(), mean_patch, atol=1e-5)
    assert reconstruction_error(book, held_out) < 0.5 * reconstruction_error(single, held_out)


def test_kmeans_encode_picks_the_nearest_code(training_images):
    book = KMeansCodebook.fit(training_images[:64], 16, seed=1)
    images = training_images[64:68]
    codes = book.encode(images)
    unit = image_to_unit(images)
    for b, token in [(0, 0), (1, 20), (3, 63)]:
        distances = ((book.codes.numpy() - patch_of(unit, b, token, 4)) ** 2).sum(1)
        assert distances[codes[b, token]] <= distances.min() + 1e-5
    # A decoded code, encoded again, is that code (codes are distinct points).
    assert torch.equal(book.encode(book.decode(codes)), codes)


def test_kmeans_deterministic_by_seed(training_images):
    a = KMeansCodebook.fit(training_images[:128], 16, seed=3)
    b = KMeansCodebook.fit(training_images[:128], 16, seed=3)
    c = KMeansCodebook.fit(training_images[:128], 16, seed=4)
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
    d, e = KMeansCodebook(16, seed=5, num_scenes=16), KMeansCodebook(16, seed=5, num_scenes=16)
    assert torch.equal(d.codes, e.codes)


def test_default_codebook_covers_every_target():
    book = KMeansCodebook(64, num_scenes=32)
    scene = make_scene(123_456)
    for target in (scene.image, depth_to_image(scene.depth), scene.seg_edges, scene.seg_colour):
        error = reconstruction_error(book, target[None])
        assert error < 0.1, f"reconstruction MSE {error:.3f} in [-1, 1] units"


def test_kmeans_state_dict_round_trip(training_images):
    book = KMeansCodebook.fit(training_images[:64], 16, seed=0)
    buffer = io.BytesIO()
    torch.save(book.state_dict(), buffer)
    buffer.seek(0)
    loaded = KMeansCodebook.from_state_dict(torch.load(buffer))
    assert torch.equal(loaded.codes, book.codes)
    assert (loaded.image_size, loaded.patch, loaded.num_codes) == (32, 4, 16)
    images = training_images[100:104]
    assert torch.equal(loaded.encode(images), book.encode(images))
    # The state is a copy: changing it does not change the codebook.
    state = book.state_dict()
    state["codes"].zero_()
    assert not torch.equal(book.codes, state["codes"])


def test_kmeans_errors(training_images):
    with pytest.raises(ValueError, match="images"):
        KMeansCodebook.fit(image_to_unit(training_images[:4]), 4)
    with pytest.raises(ValueError, match="image_size"):
        KMeansCodebook.fit(training_images[:4, :30, :30], 4)
    with pytest.raises(ValueError, match="num_codes"):
        KMeansCodebook.fit(training_images[:4], 0)
    book = KMeansCodebook.fit(training_images[:16], 8)
    with pytest.raises(ValueError, match="codes"):
        book.decode(torch.full((1, 64), 8))
    with pytest.raises(ValueError, match="codes"):
        book.decode(torch.zeros(1, 63, dtype=torch.int64))
    with pytest.raises(ValueError, match="images"):
        book.encode(training_images[:1, :16, :16])
    with pytest.raises(ValueError, match="state"):
        KMeansCodebook.from_state_dict({"codes": book.codes})
