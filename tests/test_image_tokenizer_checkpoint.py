"""--image-tokenizer: a local codebook (ar) or a local diffusers AutoencoderKL (mar / flow)
instead of the built-in image tokenizers."""
import math

import pytest
import torch

from trainer.config import ConfigError
from trainer.loop import train
from trainer.tokenizers import KMeansCodebook
from trainer_helpers import small_config, train_rows


def _tiny_vae(tmp_path, factor_blocks=3, latent_channels=4):
    diffusers = pytest.importorskip("diffusers", reason="the VAE path needs diffusers")
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * factor_blocks,
        up_block_types=("UpDecoderBlock2D",) * factor_blocks,
        block_out_channels=(8,) * (factor_blocks - 1) + (16,), layers_per_block=1,
        norm_num_groups=4, sample_size=16)
    path = tmp_path / "vae"
    vae.save_pretrained(path)
    return str(path)


def test_ar_trains_with_a_saved_codebook(tmp_path):
    book = KMeansCodebook(num_codes=16, image_size=16, patch=4, seed=3, num_scenes=8, iters=3)
    path = tmp_path / "codebook.pt"
    torch.save(book.state_dict(), path)
    run = train(small_config(tmp_path, family="ar", image_tokenizer=str(path), steps=2))
    assert all(math.isfinite(r["loss"]) for r in train_rows(run))
    with pytest.raises(ConfigError, match="--num-codes: must match the image tokenizer.*16; got 32"):
        train(small_config(tmp_path, family="ar", image_tokenizer=str(path), num_codes=32, steps=1))


def test_mar_trains_with_a_local_vae(tmp_path):
    from trainer.tokenizers import VAELatents

    path = _tiny_vae(tmp_path)   # downsampling 4 = --patch 4, 4 latent channels
    latents = VAELatents(path, 16)
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    z = latents.encode(images)
    assert z.shape == (2, 16, 4) and latents.num_tokens == 16
    assert latents.decode(z).shape == (2, 16, 16, 3)
    run = train(small_config(tmp_path, family="mar", image_tokenizer=path, latent_channels=4,
                             steps=2))
    assert all(math.isfinite(r["loss"]) for r in train_rows(run))
    with pytest.raises(ConfigError, match="--latent-channels: must match"):
        train(small_config(tmp_path, family="flow", image_tokenizer=path, latent_channels=8,
                           steps=1))


def test_a_patch_that_differs_from_the_vaes_factor_names_patch(tmp_path):
    # image size 20 is a multiple of --patch 4 but not of the VAE's 8: the VAE loaded
    # fine, yet the error used to say "--image-tokenizer: cannot load"
    from trainer.tokenizers import VAELatents

    path = _tiny_vae(tmp_path, factor_blocks=4)   # downsampling 8
    for size in (16, 20):
        with pytest.raises(ConfigError, match="--patch: must match the image tokenizer.*"
                                              "which has 8; got 4"):
            train(small_config(tmp_path, family="mar", image_tokenizer=path, image_size=size,
                               latent_channels=4, steps=1))
    with pytest.raises(ValueError, match="image_size 20 is not a multiple of the VAE's "
                                         "downsampling factor 8"):
        VAELatents(path, 20).encode(torch.zeros(1, 20, 20, 3, dtype=torch.uint8))


def test_missing_tokenizer_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="--image-tokenizer: for --family mar this must be the "
                                          "directory of a diffusers AutoencoderKL"):
        small_config(tmp_path, family="mar", image_tokenizer=str(tmp_path / "nope"))
