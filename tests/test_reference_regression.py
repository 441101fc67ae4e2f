"""Reference regression head + squared error (DESIGN.md 3.2) against float64."""
import pytest
import torch

import unimrg_fast as uf
from unimrg_fast.reference.regression import regression_loss
from numerics import assert_rel

REDUCTIONS = ("mean", "sum", "none")


def mse_float64(hidden, weight, target, *, bias=None, token_weight=None, reduction="mean"):
    h = hidden.reshape(-1, hidden.shape[-1]).double()
    p = h @ weight.double().t()
    if bias is not None:
        p = p + bias.double()
    t = target.reshape(p.shape).double()
    per_row = ((p - t) ** 2).sum(dim=1) / p.shape[1]
    w = torch.ones_like(per_row) if token_weight is None else token_weight.reshape(-1).double()
    per_row = w * per_row
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / w.sum() if w.sum() > 0 else per_row.sum() * 0


def make_inputs(n, h, c, *, dtype=torch.float32, with_bias=False, with_weight=False, lead=None):
    rows = tuple(lead or (n,))
    hidden = torch.randn(*rows, h).to(dtype).requires_grad_()
    weight = (torch.randn(c, h) * h ** -0.5).to(dtype).requires_grad_()
    bias = torch.randn(c).to(dtype).requires_grad_() if with_bias else None
    target = torch.randn(*rows, c).to(dtype)
    token_weight = torch.rand(rows) + 0.25 if with_weight else None
    return hidden, weight, bias, target, token_weight


def check_against_float64(hidden, weight, bias, target, tw, *, reduction, tol, grad_tol):
    out = regression_loss(hidden, weight, target, bias=bias, token_weight=tw, reduction=reduction)
    leaves = [None if t is None else t.detach().double().requires_grad_()
              for t in (hidden, weight, bias)]
    ref = mse_float64(leaves[0], leaves[1], target, bias=leaves[2], token_weight=tw,
                      reduction=reduction)
    assert out.dtype == torch.float32
    assert_rel(out, ref, tol, f"loss ({reduction})")
    upstream = torch.randn(out.shape, dtype=torch.float64) + 2.0
    out.backward(upstream.float())
    ref.backward(upstream)
    for name, got, want in zip(("hidden", "weight", "bias"), (hidden, weight, bias), leaves):
        if got is None:
            continue
        assert got.grad is not None and got.grad.dtype == got.dtype, f"d{name}: dtype"
        assert_rel(got.grad, want.grad, grad_tol, f"d{name} ({reduction})")
    return out


SIZES = {"one_row": (1, 7, 13), "odd": (37, 13, 7), "wide": (50, 7, 37)}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("extras", ["plain", "bias_weights"])
def test_fp32_matches_float64(seed, size, reduction, extras):
    n, h, c = SIZES[size]
    on = extras == "bias_weights"
    inputs = make_inputs(n, h, c, with_bias=on, with_weight=on)
    check_against_float64(*inputs, reduction=reduction, tol=1e-5, grad_tol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_leading_dims_and_flat_target(seed, reduction):
    hidden, weight, bias, target, tw = make_inputs(0, 13, 7, lead=(3, 5), with_bias=True,
                                                   with_weight=True)
    out = check_against_float64(hidden, weight, bias, target, tw, reduction=reduction,
                                tol=1e-5, grad_tol=1e-5)
    assert out.shape == ((15,) if reduction == "none" else ())
    flat_target = regression_loss(hidden.detach(), weight.detach(), target.reshape(15, 7),
                                  bias=bias.detach(), token_weight=tw, reduction=reduction)
    assert torch.equal(out.detach(), flat_target)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(seed, dtype):
    inputs = make_inputs(37, 13, 7, dtype=dtype, with_bias=True, with_weight=True)
    check_against_float64(*inputs, reduction="mean", tol=1e-2, grad_tol=2e-2)


def test_mean_divides_by_weight_sum_not_rows(seed):
    hidden, weight, _, target, _ = make_inputs(13, 7, 5)
    tw = torch.rand(13) * 3 + 0.5
    per_row = regression_loss(hidden, weight, target, token_weight=tw, reduction="none")
    mean = regression_loss(hidden, weight, target, token_weight=tw, reduction="mean")
    assert_rel(mean, per_row.double().sum() / tw.double().sum(), 1e-6, "mean")
    unweighted = regression_loss(hidden, weight, target, reduction="none")
    assert_rel(per_row, unweighted.double() * tw, 1e-6, "w_i * l_i")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_rows_and_zero_weights_give_zero(seed, reduction):
    weight = torch.randn(5, 7, requires_grad=True)
    empty = regression_loss(torch.randn(0, 7), weight, torch.randn(0, 5), reduction=reduction)
    assert empty.shape == ((0,) if reduction == "none" else ()) and (empty == 0).all()
    hidden = torch.randn(4, 7, requires_grad=True)
    out = regression_loss(hidden, weight, torch.randn(4, 5), token_weight=torch.zeros(4),
                          reduction=reduction)
    assert not out.isnan().any() and (out == 0).all(), out
    out.sum().backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_public_op_dispatches_to_reference(seed):
    hidden, weight, bias, target, tw = make_inputs(13, 7, 5, with_bias=True, with_weight=True)
    got = uf.regression_loss(hidden, weight, target, bias=bias, token_weight=tw, impl="reference")
    assert torch.equal(got, regression_loss(hidden, weight, target, bias=bias, token_weight=tw))


def _bad_calls():
    h, w, t = torch.randn(5, 7), torch.randn(3, 7), torch.randn(5, 3)
    return [
        (dict(hidden=h, weight=w, target=torch.randn(5, 4)), ValueError,
         r"target must have shape \[N, C\] = \(5, 3\)"),
        (dict(hidden=h, weight=w, target=torch.randn(15)), ValueError, "target must have shape"),
        (dict(hidden=h, weight=w, target=torch.randn(4, 3)), ValueError, "target must have shape"),
        (dict(hidden=h, weight=w, target=t.long()), TypeError, "target must have dtype"),
        (dict(hidden=h, weight=torch.randn(3, 6), target=t), ValueError, "weight must have shape"),
        (dict(hidden=h, weight=w, target=t, bias=torch.randn(4)), ValueError, "bias must have shape"),
        (dict(hidden=h, weight=w, target=t, token_weight=torch.rand(6)), ValueError,
         "token_weight must have one weight per row"),
        (dict(hidden=h, weight=w, target=t, reduction="mse"), ValueError, "reduction must be"),
        (dict(hidden=[[1.0]], weight=w, target=t), TypeError, "hidden must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("call,exc,match", _bad_calls())
def test_bad_arguments_raise(call, exc, match):
    call = dict(call)
    with pytest.raises(exc, match=match):
        regression_loss(call.pop("hidden"), call.pop("weight"), call.pop("target"), **call)
