"""Comparison helpers shared by the tests (DESIGN.md section 4)."""
import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (the plain norm when expected is 0)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = e.norm()
    diff = (a - e).norm()
    return (diff / scale).item() if scale > 0 else diff.item()


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> float:
    """rel_err <= tol; a non-finite value (e.g. an unwritten, NaN-poisoned element) fails.
    The message names the worst element and both values."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    bad = ~torch.isfinite(a)
    assert not bad.any(), (f"{what}: {int(bad.sum())} non-finite values, first at "
                           f"{bad.nonzero()[0].tolist()} (unwritten?)")
    err = rel_err(a, e)
    if err > tol:
        diff = a - e
        pos = diff.abs().argmax()
        idx = [int(i) for i in torch.unravel_index(pos, a.shape)] if a.dim() else []
        raise AssertionError(f"{what}: rel err {err:.3e} > {tol:.1e}; worst at {idx}: got "
                             f"{a.flatten()[pos].item():.8g}, expected {e.flatten()[pos].item():.8g}")
    return err
