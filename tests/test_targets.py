"""Regression-target helpers: cosine DDPM schedule, epsilon and flow-matching targets."""
import math

import pytest
import torch

from unimrg_fast.targets import (RegressionTarget, cosine_alphas_cumprod, ddpm_eps_target,
                                 flow_matching_target, latent_mse_target)


def assert_rel(actual, expected, tol, what):
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    diff = a - e
    err = (diff.norm() / e.norm()).item()
    if err > tol:
        pos = diff.abs().argmax()
        idx = [int(i) for i in torch.unravel_index(pos, a.shape)]
        raise AssertionError(f"{what}: rel err {err:.3e} > {tol:.1e}; worst at {idx}: "
                             f"got {a.flatten()[pos].item():.10g}, expected {e.flatten()[pos].item():.10g}")


def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


# -------------------------------------------------------------------------- schedule
def test_cosine_schedule_values():
    a = cosine_alphas_cumprod()
    assert a.dtype == torch.float64 and a.shape == (1000,)
    assert (a > 0).all() and (a <= 1).all()
    assert (a[1:] < a[:-1]).all(), "alphas_cumprod must strictly decrease"
    assert 1 - 1e-4 < a[0] < 1, f"first alpha_bar should be ~1, got {a[0]}"
    assert a[-1] < 1e-6, f"last alpha_bar should be ~0, got {a[-1]}"
    # The cumulative product telescopes to alpha_bar((i + 1) / T) / alpha_bar(0) wherever
    # beta was not clipped at 0.999 (everywhere but the very last steps).
    expected = torch.tensor([alpha_bar((i + 1) / 1000) / alpha_bar(0) for i in range(1000)],
                            dtype=torch.float64)
    assert torch.allclose(a[:990], expected[:990], rtol=1e-9, atol=0), \
        f"max diff {(a[:990] - expected[:990]).abs().max()}"
    betas = 1 - a / torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    assert betas.max() <= 0.999 + 1e-12 and abs(betas[-1].item() - 0.999) < 1e-12


def test_cosine_schedule_other_length_and_errors():
    a = cosine_alphas_cumprod(7)
    assert a.shape == (7,) and (a[1:] < a[:-1]).all()
    kept = a.clone()
    a.zero_()  # the helper caches its table; a caller's in-place edit must not leak into it
    assert torch.equal(cosine_alphas_cumprod(7), kept)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
            cosine_alphas_cumprod(bad)
    for bad in ("0.5", 1.0, None):
        with pytest.raises(ValueError, match="max_beta must be in"):
            cosine_alphas_cumprod(7, max_beta=bad)


def test_float_num_steps_is_refused_after_the_int_table_is_cached():
    x0 = torch.randn(3, 2)
    ddpm_eps_target(x0, num_steps=1000)         # caches the 1000-step table
    with pytest.raises(ValueError, match="num_steps must be an int >= 1, got 1000.0"):
        ddpm_eps_target(x0, num_steps=1000.0)


# ---------------------------------------------------------------------------- DDPM
def test_ddpm_formula_with_explicit_noise_and_steps(seed):
    x0 = torch.randn(5, 3, 7)
    eps = torch.randn(5, 3, 7)
    t = torch.tensor([0, 1, 499, 998, 999])
    out = ddpm_eps_target(x0, eps=eps, timesteps=t)
    assert isinstance(out, RegressionTarget)
    assert torch.equal(out.target, eps) and torch.equal(out.timestep, t)
    a = torch.tensor([alpha_bar((int(i) + 1) / 1000) / alpha_bar(0) for i in t], dtype=torch.float64)
    a[-1] = cosine_alphas_cumprod()[-1]  # the last step's beta is clipped
    expected = a.sqrt()[:, None, None] * x0.double() + (1 - a).sqrt()[:, None, None] * eps.double()
    assert out.noisy.dtype == torch.float32
    assert_rel(out.noisy, expected, 1e-6, "x_t")
    # The ends of the schedule: almost clean at t = 0, almost pure noise at t = 999.
    # (sqrt(1 - a_bar_0) ~ 6e-3: the first step already adds a little noise.) The
    # distance is bounded by the two coefficients times the draws' norm ratio, so the
    # bound holds for every seed (a fixed 1e-2 failed on one where |eps| > 1.7 |x0|).
    a0, a999 = float(a[0]), float(a[-1])
    assert math.sqrt(1 - a0) < 1e-2 and math.sqrt(a999) < 1e-4
    ratio = lambda u, v: float(u.norm() / v.norm())   # noqa: E731
    assert_rel(out.noisy[0], x0[0], 1 - math.sqrt(a0) + math.sqrt(1 - a0) * ratio(eps[0], x0[0])
               + 1e-6, "x_0 ~ x0")
    assert_rel(out.noisy[-1], eps[-1], 1 - math.sqrt(1 - a999)
               + math.sqrt(a999) * ratio(x0[-1], eps[-1]) + 1e-6, "x_999 ~ eps")


def test_ddpm_draws_are_deterministic_with_a_generator(seed):
    x0 = torch.randn(64, 5)
    a = ddpm_eps_target(x0, generator=torch.Generator().manual_seed(seed))
    b = ddpm_eps_target(x0, generator=torch.Generator().manual_seed(seed))
    c = ddpm_eps_target(x0, generator=torch.Generator().manual_seed(seed + 1))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.target, c.target) and not torch.equal(a.timestep, c.timestep)
    assert a.timestep.dtype == torch.int64 and a.timestep.shape == (64,)
    assert a.timestep.min() >= 0 and a.timestep.max() < 1000
    assert a.timestep.unique().numel() > 32, "timesteps should be spread over [0, 1000)"
    # noisy is exactly the formula applied to the drawn eps and t
    again = ddpm_eps_target(x0, eps=a.target, timesteps=a.timestep)
    assert torch.equal(again.noisy, a.noisy)


def test_ddpm_int_timestep_and_low_precision(seed):
    x0 = torch.randn(3, 4, dtype=torch.bfloat16)
    out = ddpm_eps_target(x0, timesteps=250, generator=torch.Generator().manual_seed(seed))
    assert out.noisy.dtype == out.target.dtype == torch.bfloat16
    assert torch.equal(out.timestep, torch.full((3,), 250))
    a = cosine_alphas_cumprod()[250]
    assert_rel(out.noisy, a.sqrt() * x0.double() + (1 - a).sqrt() * out.target.double(), 1e-2,
               "bf16 x_t")


def test_out_of_range_timesteps_poison_their_rows_where_the_check_is_skipped(monkeypatch):
    """On a GPU the range checks are skipped (they would sync the host). a_bar[-1] then
    read step 999 and s = 1.5 extrapolated, silently; now those rows are NaN."""
    import importlib

    targets = importlib.import_module("unimrg_fast.targets")
    monkeypatch.setattr(targets, "check_index_range", lambda *a, **k: None)   # as on CUDA
    monkeypatch.setattr(targets, "_check_unit_interval", lambda *a, **k: None)
    x0 = torch.randn(4, 3)
    out = ddpm_eps_target(x0, timesteps=torch.tensor([-1, 5, 1000, 999]))
    assert out.noisy[[0, 2]].isnan().all() and out.noisy[[1, 3]].isfinite().all()
    want = ddpm_eps_target(x0[[1, 3]], eps=out.target[[1, 3]], timesteps=torch.tensor([5, 999]))
    assert torch.equal(out.noisy[[1, 3]], want.noisy)
    out = flow_matching_target(x0, timesteps=torch.tensor([1.5, 0.25, -0.1, 1.0]))
    assert out.noisy[[0, 2]].isnan().all() and out.noisy[[1, 3]].isfinite().all()


def test_ddpm_errors():
    x0 = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"timesteps must hold values in \[0, 1000\)"):
        ddpm_eps_target(x0, timesteps=torch.tensor([0, 1, 1000, 2]))
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, num_steps\)"):
        ddpm_eps_target(x0, timesteps=-1)
    with pytest.raises(TypeError, match="timesteps must have dtype int64"):
        ddpm_eps_target(x0, timesteps=torch.rand(4))
    with pytest.raises(ValueError, match=r"timesteps must have shape \[B\] = \(4,\)"):
        ddpm_eps_target(x0, timesteps=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="eps must have the shape of x0"):
        ddpm_eps_target(x0, eps=torch.randn(4, 2))
    with pytest.raises(TypeError, match="x0 must have dtype"):
        ddpm_eps_target(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="x0 must have at least 1 dimension"):
        ddpm_eps_target(torch.tensor(1.0))


# ---------------------------------------------------------------------------- flow
def test_flow_formula_and_ends(seed):
    x0, eps = torch.randn(4, 2, 5), torch.randn(4, 2, 5)
    s = torch.tensor([0.0, 0.3, 0.77, 1.0])
    out = flow_matching_target(x0, eps=eps, timesteps=s)
    s64 = s.double()[:, None, None]
    assert_rel(out.noisy, (1 - s64) * x0.double() + s64 * eps.double(), 1e-6, "x_s")
    assert_rel(out.target, eps.double() - x0.double(), 1e-7, "eps - x0")
    assert torch.equal(out.noisy[0], x0[0]) and torch.equal(out.noisy[-1], eps[-1])
    assert out.timestep.dtype == torch.float32 and torch.equal(out.timestep, s)
    # the velocity integrates from x0 at s = 0 to eps at s = 1
    assert_rel(x0 + out.target, eps, 1e-6, "x0 + v")


def test_flow_draws_deterministic_and_shifted(seed):
    x0 = torch.randn(256, 3)
    a = flow_matching_target(x0, generator=torch.Generator().manual_seed(seed))
    b = flow_matching_target(x0, generator=torch.Generator().manual_seed(seed))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    s = a.timestep
    assert s.shape == (256,) and (s > 0).all() and (s < 1).all()
    assert abs(s.mean().item() - 0.5) < 0.1, "logit-normal draws are centred on 0.5"
    shifted = flow_matching_target(x0, generator=torch.Generator().manual_seed(seed), shift=3.0)
    assert_rel(shifted.timestep, 3 * s.double() / (1 + 2 * s.double()), 1e-6, "shifted s")
    assert torch.equal(shifted.target, a.target), "the shift changes s, not the noise"


def test_flow_float_timestep_and_errors():
    x0 = torch.randn(3, 4)
    out = flow_matching_target(x0, timesteps=0.25, eps=torch.zeros(3, 4) + 2)
    assert torch.allclose(out.noisy, 0.75 * x0 + 0.5)
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, 1\]"):
        flow_matching_target(x0, timesteps=1.5)
    with pytest.raises(ValueError, match=r"timesteps must hold values in \[0, 1\]; found"):
        flow_matching_target(x0, timesteps=torch.tensor([0.1, -0.2, 0.5]))
    with pytest.raises(ValueError, match=r"timesteps must hold values in \[0, 1\]"):
        flow_matching_target(x0, timesteps=torch.tensor([0.1, float("nan"), 0.5]))
    with pytest.raises(ValueError, match="shift must be"):
        flow_matching_target(x0, shift=0.0)


def test_latent_mse_target(seed):
    x0 = torch.randn(3, 7)
    out = latent_mse_target(x0)
    assert out.noisy is x0 and out.target is x0 and out.timestep is None
    with pytest.raises(TypeError, match="x0 must be a torch.Tensor"):
        latent_mse_target([1.0, 2.0])


def test_ddpm_reuses_one_schedule_table_per_device():
    """The trainer calls ddpm_eps_target every step: the table must stay on the device
    (a fresh host-to-GPU copy per step would stall it), and callers of the public
    cosine_alphas_cumprod get their own copy that cannot corrupt it."""
    from unimrg_fast import targets

    first = targets._schedule_on(1000, torch.device("cpu"))
    assert targets._schedule_on(1000, torch.device("cpu")) is first
    t = torch.arange(1001, dtype=torch.float64) / 1000   # the closed form, computed apart
    alpha_bar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    want = torch.cumprod(1 - (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999), 0)
    public = targets.cosine_alphas_cumprod(1000)
    assert public.data_ptr() != first.data_ptr()
    public.zero_()
    for table in (first, targets._schedule_on(1000, torch.device("cpu")),
                  targets.cosine_alphas_cumprod(1000)):
        torch.testing.assert_close(table, want, rtol=1e-12, atol=0)
    x0 = torch.randn(3, 4)
    out = targets.ddpm_eps_target(x0, timesteps=500)
    a = first[500].float()
    assert torch.allclose(out.noisy, a.sqrt() * x0 + (1 - a).sqrt() * out.target, atol=1e-6)


def test_the_package_exposes_the_targets_module():
    # the README's table names uf.targets after `import unimrg_fast as uf`
    import unimrg_fast as uf
    from unimrg_fast import targets

    assert uf.targets is targets and uf.targets.ddpm_eps_target is ddpm_eps_target
