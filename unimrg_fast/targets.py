"""Regression targets for generation tasks (DESIGN.md section 3.2).

A regression head predicts `target` from the model's view of `noisy`; the caller feeds
`noisy` (and `timestep`) to the model and gives `target` to `regression_loss`:

    latent_mse_target(x0)   noisy = x0                                   target = x0
    ddpm_eps_target(x0)     noisy = sqrt(a_bar_t) x0 + sqrt(1-a_bar_t) eps  target = eps
    flow_matching_target(x0) noisy = (1 - s) x0 + s eps                  target = eps - x0

Timesteps are drawn per row of dim 0 (a sample for image latents [B, ...], or a token
for MAR/Harmon's per-token diffusion [B*L, C]) and broadcast over the other dims.
DDPM uses the cosine schedule of Nichol & Dhariwal as OpenAI's gaussian_diffusion,
MAR and Harmon build it (float64, 1,000 steps); flow matching follows OpenUni and
BAGEL (s = 0 is clean, s = 1 is pure noise). Every random draw accepts an explicit
value or a torch.Generator, so a run can be replayed exactly.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Union

import torch

from unimrg_fast._validation import (FLOAT_DTYPES, check_index_range, check_tensor,
                                     debug_checks_enabled)

DDPM_STEPS = 1000


class RegressionTarget(NamedTuple):
    """What a target helper returns."""

    noisy: torch.Tensor
    """Model input, shape and dtype of x0 (x0 itself for latent MSE)."""
    target: torch.Tensor
    """What the regression head should predict, shape and dtype of x0."""
    timestep: Optional[torch.Tensor]
    """[B]: int64 DDPM step in [0, num_steps), or fp32 flow time s in [0, 1];
    None for latent MSE (no noise)."""


# ------------------------------------------------------------------------ schedule
@functools.lru_cache(maxsize=8)
def _cosine_alphas_cumprod_cpu(num_steps: int, max_beta: float) -> torch.Tensor:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps),
                              max_beta) for i in range(num_steps)], dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def cosine_alphas_cumprod(num_steps: int = DDPM_STEPS, *, max_beta: float = 0.999,
                          device: Optional[Union[torch.device, str]] = None) -> torch.Tensor:
    """alphas_cumprod [num_steps] float64 of the cosine schedule (Nichol & Dhariwal 2021).

    alpha_bar(t) = cos(((t / T) + 0.008) / 1.008 * pi / 2)^2,
    beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta),
    alphas_cumprod = cumprod(1 - beta): decreasing, in (0, 1], the first ~1 - 4e-5.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if isinstance(max_beta, bool) or not isinstance(max_beta, (int, float)) \
            or not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must be in (0, 1), got {max_beta!r}")
    # A copy: the cached table must not change under a caller's in-place edit.
    return _cosine_alphas_cumprod_cpu(num_steps, float(max_beta)).to(device, copy=True)


_schedules_on_device: dict = {}


def _schedule_on(num_steps: int, device: torch.device) -> torch.Tensor:
    """The cosine table, kept on `device` after its first use: a pageable host-to-GPU copy
    on every training step would make the step wait for the GPU. Read-only by convention
    (private; cosine_alphas_cumprod hands callers their own copy)."""
    # The type is part of the key: 1000.0 == 1000 would otherwise find the int's table
    # and skip cosine_alphas_cumprod's check that refuses a float.
    key = (type(num_steps), num_steps, device)
    if key not in _schedules_on_device:
        _schedules_on_device[key] = cosine_alphas_cumprod(num_steps, device=device)
    return _schedules_on_device[key]


# ------------------------------------------------------------------------- helpers
def _check_x0(x0: torch.Tensor) -> None:
    check_tensor(x0, "x0", dtypes=FLOAT_DTYPES + (torch.float64,))
    if x0.dim() < 1:
        raise ValueError("x0 must have at least 1 dimension [B, ...], got a scalar")


def _noise(x0: torch.Tensor, eps: Optional[torch.Tensor],
           generator: Optional[torch.Generator]) -> torch.Tensor:
    if eps is None:
        return torch.randn(x0.shape, generator=generator, dtype=torch.float32,
                           device=x0.device).to(x0.dtype)
    check_tensor(eps, "eps", dtypes=FLOAT_DTYPES + (torch.float64,), device=x0.device)
    if eps.shape != x0.shape:
        raise ValueError(f"eps must have the shape of x0 {tuple(x0.shape)}, got {tuple(eps.shape)}")
    return eps


def _per_row(coef: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] so it broadcasts over x0's trailing dims."""
    return coef.reshape((x0.shape[0],) + (1,) * (x0.dim() - 1))


def _check_unit_interval(s: torch.Tensor, name: str) -> None:
    # Like check_index_range: free on CPU, on GPU only in debug mode (no host sync).
    if s.numel() == 0 or (s.is_cuda and not debug_checks_enabled()):
        return
    bad = ~((s >= 0) & (s <= 1))  # also catches NaN
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must hold values in [0, 1]; found {s[pos].item()} at index {pos}")


# -------------------------------------------------------------------------- targets
def latent_mse_target(x0: torch.Tensor) -> RegressionTarget:
    """Plain MSE on a latent: the head predicts x0 itself (no noise, no timestep)."""
    _check_x0(x0)
    return RegressionTarget(x0, x0, None)


def ddpm_eps_target(x0: torch.Tensor, *, eps: Optional[torch.Tensor] = None,
                    timesteps: Optional[Union[torch.Tensor, int]] = None,
                    generator: Optional[torch.Generator] = None,
                    num_steps: int = DDPM_STEPS) -> RegressionTarget:
    """DDPM epsilon-prediction (MAR / Harmon's diffusion loss, cosine schedule).

    x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) eps, target eps.

    Args:
        x0: [B, ...] clean latents, fp32 / fp16 / bf16 / fp64.
        eps: noise with x0's shape, or None to draw N(0, 1) (from `generator`).
        timesteps: [B] int64 in [0, num_steps), one int for all rows, or None to draw
            uniformly (from `generator`).
        generator: a torch.Generator on x0's device for the draws.
        num_steps: schedule length (1,000 in MAR / Harmon / UniMRG).

    Returns:
        RegressionTarget(noisy x_t, target eps, timestep [B] int64); noisy and target in
        x0's dtype, the mix computed in fp32 (fp64 for fp64 x0) with fp32 coefficients
        as OpenAI's _extract_into_tensor does.
    """
    _check_x0(x0)
    a_bar = _schedule_on(num_steps, x0.device)
    batch = x0.shape[0]
    if timesteps is None:
        t = torch.randint(0, num_steps, (batch,), generator=generator, device=x0.device)
    elif isinstance(timesteps, int) and not isinstance(timesteps, bool):
        if not 0 <= timesteps < num_steps:
            raise ValueError(f"timesteps must be in [0, num_steps) = [0, {num_steps}), "
                             f"got {timesteps}")
        t = torch.full((batch,), timesteps, dtype=torch.int64, device=x0.device)
    else:
        check_tensor(timesteps, "timesteps", ndim=1, dtypes=(torch.int64,), device=x0.device)
        if timesteps.shape[0] != batch:
            raise ValueError(f"timesteps must have shape [B] = ({batch},) (one per row of "
                             f"x0's dim 0), got {tuple(timesteps.shape)}")
        check_index_range(timesteps, "timesteps", 0, num_steps)
        t = timesteps
    noise = _noise(x0, eps, generator)
    math_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    # On a GPU the range check above is skipped (no host sync): an out-of-range step reads
    # no wrapped-around a_bar[-1] but NaN, which poisons its row's loss (DESIGN.md 4).
    a = torch.where((t >= 0) & (t < num_steps), a_bar[t.clamp(0, num_steps - 1)],
                    float("nan"))  # [B] float64
    sqrt_a = _per_row(a.sqrt().to(math_dtype), x0)
    sqrt_1ma = _per_row((1.0 - a).sqrt().to(math_dtype), x0)
    noisy = sqrt_a * x0.to(math_dtype) + sqrt_1ma * noise.to(math_dtype)
    return RegressionTarget(noisy.to(x0.dtype), noise.to(x0.dtype), t)


def flow_matching_target(x0: torch.Tensor, *, eps: Optional[torch.Tensor] = None,
                         timesteps: Optional[Union[torch.Tensor, float]] = None,
                         generator: Optional[torch.Generator] = None,
                         shift: float = 1.0) -> RegressionTarget:
    """Rectified-flow / flow-matching velocity target (OpenUni, BAGEL).

    x_s = (1 - s) x0 + s eps, target eps - x0.

    Args:
        x0: [B, ...] clean latents.
        eps: noise with x0's shape, or None to draw N(0, 1) (from `generator`).
        timesteps: s, [B] float in [0, 1], one float for all rows, or None to draw
            s = sigmoid(n), n ~ N(0, 1) (logit-normal, BAGEL's sampler), then shifted.
        generator: a torch.Generator on x0's device for the draws.
        shift: BAGEL's timestep shift applied to drawn s: shift*s / (1 + (shift-1)*s);
            1 leaves s unchanged. Not applied to explicit timesteps.

    Returns:
        RegressionTarget(noisy x_s, target eps - x0, timestep s [B] fp32).
    """
    _check_x0(x0)
    if not isinstance(shift, (int, float)) or isinstance(shift, bool) \
            or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite float > 0, got {shift!r}")
    batch = x0.shape[0]
    if timesteps is None:
        s = torch.sigmoid(torch.randn((batch,), generator=generator, dtype=torch.float32,
                                      device=x0.device))
        s = shift * s / (1 + (shift - 1) * s)
    elif isinstance(timesteps, (int, float)) and not isinstance(timesteps, bool):
        if not 0.0 <= float(timesteps) <= 1.0:
            raise ValueError(f"timesteps must be in [0, 1], got {timesteps!r}")
        s = torch.full((batch,), float(timesteps), dtype=torch.float32, device=x0.device)
    else:
        check_tensor(timesteps, "timesteps", ndim=1, dtypes=FLOAT_DTYPES + (torch.float64,),
                     device=x0.device)
        if timesteps.shape[0] != batch:
            raise ValueError(f"timesteps must have shape [B] = ({batch},) (one per row of "
                             f"x0's dim 0), got {tuple(timesteps.shape)}")
        _check_unit_interval(timesteps, "timesteps")
        s = timesteps.float()
        s = torch.where((s >= 0) & (s <= 1), s, float("nan"))   # GPU: NaN, not extrapolation
    noise = _noise(x0, eps, generator)
    math_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    s_row = _per_row(s.to(math_dtype), x0)
    x, e = x0.to(math_dtype), noise.to(math_dtype)
    noisy = (1.0 - s_row) * x + s_row * e
    return RegressionTarget(noisy.to(x0.dtype), (e - x).to(x0.dtype), s)
