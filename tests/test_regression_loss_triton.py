"""Fused Triton regression head + squared error (DESIGN.md 3.2) against float64.

CPU lane: the Triton interpreter (conftest sets TRITON_INTERPRET=1), tiny odd shapes
and 16-wide tiles, fp32 and fp16. GPU lane (`gpu` marker): bf16 / fp16 at the shapes
that matter, against the same-dtype reference under the FlashAttention rule.
"""
import importlib

import pytest
import torch

import unimrg_fast as uf
from numerics import assert_rel, rel_err

rl = importlib.import_module("unimrg_fast.ops.regression_loss")
try:
    from unimrg_fast.reference.regression import regression_loss as reference_loss
except ImportError as exc:  # pragma: no cover - while the reference twin is missing
    reference_loss, _REFERENCE_MISSING = None, f"reference regression_loss not importable: {exc}"
else:
    _REFERENCE_MISSING = ""

REDUCTIONS = ("mean", "sum", "none")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


# ------------------------------------------------------------------ helpers


def float64_oracle(hidden, weight, target, bias, token_weight, reduction, grad_out):
    """Loss and analytic gradients in float64 on upcast inputs, written out explicitly
    (no autograd, no shared helper): p = h W^T + b, l_i = w_i mean_c (p - t)^2."""
    n, c = target.numel() // weight.shape[0], weight.shape[0]
    h = hidden.detach().reshape(n, hidden.shape[-1]).double()
    p = h @ weight.detach().double().t()
    if bias is not None:
        p = p + bias.detach().double()
    r = p - target.detach().reshape(n, c).double()
    w = (torch.ones(n, dtype=torch.float64, device=h.device) if token_weight is None
         else token_weight.detach().double())
    mse = (r * r).sum(1) / c
    per_row = w * mse
    g = grad_out.detach().double()
    if reduction == "none":
        loss, g_row, dw_row = per_row, g, g * mse
    elif reduction == "sum":
        loss, g_row, dw_row = per_row.sum(), g.expand(n), g * mse
    else:
        den = w.sum()
        loss = per_row.sum() / den if den > 0 else per_row.sum() * 0
        g_row = (g / den if den > 0 else g * 0).expand(n)
        dw_row = g_row * (mse - loss)  # the quotient rule: w_j is in sum w too
    dp = (2.0 / c) * (w * g_row)[:, None] * r
    grads = {"hidden": (dp @ weight.detach().double()).reshape(hidden.shape),
             "weight": dp.t() @ h, "bias": dp.sum(0), "target": (-dp).reshape(target.shape),
             "token_weight": dw_row}
    return loss, grads


def make_inputs(n, h, c, *, dtype=torch.float32, bias=False, token_weight=False, lead=None,
                device="cpu"):
    rows = tuple(lead or (n,))
    hidden = torch.randn(*rows, h, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(c, h, device=device) * max(h, 1) ** -0.5).to(dtype).requires_grad_()
    b = torch.randn(c, device=device).to(dtype).requires_grad_() if bias else None
    target = torch.randn(*rows, c, device=device).to(dtype)
    tw = torch.rand(rows, device=device).reshape(-1) + 0.25 if token_weight else None
    return hidden, weight, b, target, tw


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an unwritten element fails."""
    def full_of_nan(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(rl, "_empty", full_of_nan)


def run_and_check(hidden, weight, b, target, tw, *, reduction, tol, grad_tol, wrt=None,
                  grad_out=None):
    """Fused forward + backward against the float64 oracle; returns (loss, grads, grad_out).
    grad_out: the upstream gradient (default: random normal of the output's shape)."""
    out = rl._triton(hidden, weight, target, bias=b, token_weight=tw, reduction=reduction)
    assert out.dtype == torch.float32
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    named = {"hidden": hidden, "weight": weight, "bias": b, "target": target,
             "token_weight": tw}
    wrt = [k for k in (wrt or named) if named[k] is not None and named[k].requires_grad]
    grads = dict(zip(wrt, torch.autograd.grad(out, [named[k] for k in wrt], grad_out)))
    ref, ref_grads = float64_oracle(hidden, weight, target, b, tw, reduction, grad_out)
    assert_rel(out, ref, tol, f"loss ({reduction})")
    for k, g in grads.items():
        assert g.dtype == named[k].dtype, f"d{k} dtype {g.dtype} != {named[k].dtype}"
        assert_rel(g, ref_grads[k], grad_tol, f"d{k} ({reduction})")
    return out, grads, grad_out


# ------------------------------------------------------------------ CPU lane
CASES = [  # (n, H, C, bias, token_weight): ragged against the interpreter's 16-wide tiles
    (37, 45, 7, True, True),
    (40, 47, 20, False, True),   # C > 16: two channel blocks, the fallback loop
    (23, 33, 16, True, False),   # C exactly one block (the only block-multiple size here)
    (1, 17, 3, True, True),      # one row
    (18, 5, 1, False, False),    # C = 1, H < one tile
    (9, 0, 3, True, True),       # H = 0: only the bias reaches the prediction
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}-H{}-C{}-b{:d}-w{:d}".format(*c))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fp32_matches_float64(seed, poison, case, reduction):
    n, h, c, bias, tw = case
    inputs = make_inputs(n, h, c, bias=bias, token_weight=tw)
    run_and_check(*inputs, reduction=reduction, tol=1e-5, grad_tol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fp16_matches_float64(seed, poison, reduction):
    inputs = make_inputs(35, 47, 20, dtype=torch.float16, bias=True, token_weight=True)
    # products of fp16 values are exact in fp32: the loss is fp32-accurate; the
    # gradients carry one fp16 rounding
    run_and_check(*inputs, reduction=reduction, tol=1e-5, grad_tol=2e-3)


def test_bf16_matches_float64(seed, poison):
    # the kernels upcast right after every load, so bf16 runs even in the interpreter
    inputs = make_inputs(33, 40, 5, dtype=torch.bfloat16, bias=True, token_weight=True)
    run_and_check(*inputs, reduction="mean", tol=1e-5, grad_tol=1e-2)


def test_bf16_gradients_are_rounded_to_nearest(seed, poison):
    # dh and dt are fp32 sums rounded once to bf16. The interpreter truncates fp32 to bf16
    # inside a kernel (about half the elements then differ by one bf16 ulp, always
    # towards zero); a GPU rounds to nearest even. Either way the result must be the
    # round-to-nearest of the float64 gradient, up to rare double roundings.
    hidden, weight, _, target, _ = make_inputs(64, 32, 7, dtype=torch.bfloat16)
    target.requires_grad_()
    out = rl._triton(hidden, weight, target, reduction="sum")
    dh, dt = torch.autograd.grad(out, [hidden, target])
    _, ref = float64_oracle(hidden, weight, target, None, None, "sum", torch.tensor(1.0))
    for name, got, want in (("dh", dh, ref["hidden"]), ("dt", dt, ref["target"])):
        assert got.dtype == torch.bfloat16
        exact = (got == want.to(torch.bfloat16)).float().mean().item()
        assert exact >= 0.99, f"{name}: only {exact:.1%} equal round-to-nearest bf16"
        bias = (((got.double() - want) * want.sign()).sum() / want.abs().sum()).item()
        assert abs(bias) < 5e-4, f"{name}: rounding is biased ({bias:.2e} of |grad|)"


def test_autocast_computes_in_the_autocast_dtype(seed):
    hidden, weight, b, target, _ = make_inputs(17, 24, 6, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rl._triton(hidden, weight, target, bias=b)
    grads = torch.autograd.grad(out, [hidden, weight, b])
    assert all(g.dtype == torch.float32 for g in grads)
    cast = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight, b)]
    expected = rl._triton(cast[0], cast[1], target, bias=cast[2])
    assert torch.equal(out, expected)
    for g, e in zip(grads, torch.autograd.grad(expected, cast)):
        assert torch.equal(g, e.float())


def test_fp16_gradients_below_fp16_normal_range_keep_precision(seed, poison):
    # dp = 2 w g r / (C sum w) ~ 1e-6 lies in fp16's subnormal range (5% precision) while
    # dh = dp W ~ 5e-4 does not: a backward that rounds dp to fp16 before its dots fails
    # here; the kernel keeps dp in fp32 (tf32x3 dots on a GPU)
    hidden, weight, b, target, _ = make_inputs(40, 19, 16, dtype=torch.float16, bias=True)
    with torch.no_grad():
        hidden.mul_(1e-2)
        weight.mul_(400.0)
    # a fixed upstream gradient: a random scalar of scale 1e-4 could itself push dh below
    # fp16's normal range, where the fp16 output alone rounds by more than grad_tol
    _, grads, _ = run_and_check(hidden, weight, b, target, None, reduction="mean", tol=1e-5,
                                grad_tol=2e-3, wrt=("hidden",), grad_out=torch.tensor(1e-4))
    assert grads["hidden"].abs().max() > 1e-4


def test_leading_dims_target_grad_and_token_weight_grad(seed, poison):
    hidden, weight, b, target, _ = make_inputs(0, 26, 5, bias=True, lead=(3, 7))
    target.requires_grad_()
    tw = (torch.rand(21) + 0.1).requires_grad_()
    run_and_check(hidden, weight, b, target, tw, reduction="mean", tol=1e-5, grad_tol=1e-5)


def test_strided_and_mixed_dtype_inputs(seed, poison):
    # hidden a column-strided view (no copy), weight fp32 against fp16 hidden (upcast in
    # the kernel), bias bf16, target float64
    hidden = torch.randn(19, 2 * 26).half()[:, ::2].requires_grad_()
    hidden_view = torch.randn(19, 2 * 26)[:, ::2].requires_grad_()
    assert hidden.stride() == hidden_view.stride() == (52, 2)
    weight = (torch.randn(6, 26) / 5).requires_grad_()
    b = torch.randn(6).bfloat16().requires_grad_()
    target = torch.randn(19, 6, dtype=torch.float64)
    run_and_check(hidden, weight, b, target, None, reduction="sum", tol=1e-5, grad_tol=8e-3)
    run_and_check(hidden_view, weight, None, target, None, reduction="mean", tol=1e-5,
                  grad_tol=1e-5)


@pytest.mark.parametrize("wrt", [("hidden",), ("weight",), ("bias",), ("target",)])
def test_each_gradient_alone(seed, poison, wrt):
    hidden, weight, b, target, tw = make_inputs(26, 35, 18, bias=True, token_weight=True)
    for t, name in ((hidden, "hidden"), (weight, "weight"), (b, "bias")):
        t.requires_grad_(name in wrt)
    target.requires_grad_("target" in wrt)
    _, grads, _ = run_and_check(hidden, weight, b, target, tw, reduction="mean", tol=1e-5,
                                grad_tol=1e-5, wrt=wrt)
    assert set(grads) == set(wrt)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_rows(poison, reduction):
    hidden, weight, b, target, _ = make_inputs(0, 24, 5, bias=True)
    out = rl._triton(hidden, weight, target, bias=b, reduction=reduction)
    assert out.shape == ((0,) if reduction == "none" else ())
    assert torch.all(out == 0)
    dh, dw, db = torch.autograd.grad(out.sum() + 0 * weight.sum(), [hidden, weight, b])
    assert dh.shape == (0, 24)
    assert torch.all(dw == 0) and torch.all(db == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_weights(seed, poison, reduction):
    hidden, weight, b, target, _ = make_inputs(21, 30, 9, bias=True)
    tw = torch.zeros(21)
    out = rl._triton(hidden, weight, target, bias=b, token_weight=tw, reduction=reduction)
    grads = torch.autograd.grad(out.sum(), [hidden, weight, b])
    assert torch.all(out == 0), "weights summing to 0 must give 0, not NaN"
    for g in grads:
        assert torch.all(g == 0), f"non-zero gradient with zero weights: {g}"
    # some zero weights among positive ones: those rows get exactly zero gradient
    tw = torch.rand(21) + 0.5
    tw[::3] = 0
    _, grads, _ = run_and_check(hidden, weight, b, target, tw, reduction=reduction, tol=1e-5,
                                grad_tol=1e-5)
    assert torch.all(grads["hidden"][::3] == 0)


def test_backward_is_deterministic(seed):
    hidden, weight, b, target, tw = make_inputs(40, 37, 20, bias=True, token_weight=True)
    runs = []
    for _ in range(2):
        out = rl._triton(hidden, weight, target, bias=b, token_weight=tw)
        runs.append(torch.autograd.grad(out, [hidden, weight, b]))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.skipif(reference_loss is None, reason=_REFERENCE_MISSING or "reference present")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_reference_twin(seed, reduction, bias):
    hidden, weight, b, target, tw = make_inputs(29, 39, 11, bias=bias, token_weight=True)
    leaves = [hidden, weight] + ([b] if bias else [])
    out = uf.regression_loss(hidden, weight, target, bias=b, token_weight=tw,
                             reduction=reduction, impl="triton")
    ref = reference_loss(hidden, weight, target, bias=b, token_weight=tw, reduction=reduction)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    assert_rel(out, ref, 1e-5, "loss vs reference")
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert_rel(g, rg, 1e-5, f"d{name} vs reference")


def test_public_op_dispatches_to_triton(seed, monkeypatch):
    calls = []
    real = rl._fwd_op
    monkeypatch.setattr(rl, "_fwd_op", lambda *a: calls.append(1) or real(*a))
    hidden, weight, _, target, _ = make_inputs(5, 9, 3)
    out = uf.regression_loss(hidden, weight, target, impl="triton")
    assert calls == [1] and out.shape == ()


def _bad_calls():
    h, w, t = torch.randn(4, 8), torch.randn(3, 8), torch.randn(4, 3)
    return [
        (lambda: rl._triton([1.0], w, t), TypeError, "hidden must be a torch.Tensor"),
        (lambda: rl._triton(h.long(), w, t), TypeError, "hidden must have dtype"),
        (lambda: rl._triton(h, torch.randn(3, 7), t), ValueError, r"weight must have shape \[C, H\]"),
        (lambda: rl._triton(h, torch.randn(0, 8), t), ValueError, "at least one output row"),
        (lambda: rl._triton(h, w, t, bias=torch.randn(4)), ValueError, "bias must have shape"),
        (lambda: rl._triton(h, w, torch.randn(4, 2)), ValueError, r"target must have shape \[N, C\]"),
        (lambda: rl._triton(h, w, t.long()), TypeError, "target must have dtype"),
        (lambda: rl._triton(h, w, t, token_weight=torch.rand(5)), ValueError,
         "token_weight must have one weight per row"),
        (lambda: rl._triton(h, w, t, reduction="avg"), ValueError, "reduction must be"),
    ]


@pytest.mark.parametrize("call,exc,match", _bad_calls(), ids=lambda x: "" if callable(x) else None)
def test_bad_arguments_raise(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_custom_ops_pass_opcheck(seed):
    # schema, fake kernels, autograd registration and AOT dispatch of both ops; the
    # interpreter runs each kernel a handful of times on these tiny shapes
    hidden, weight, b, target, _ = make_inputs(9, 18, 5, bias=True)
    torch.library.opcheck(rl._fwd_op, (hidden, weight, target, b))
    mse, residual = rl._fwd_op(hidden.detach(), weight.detach(), target, b.detach())
    torch.library.opcheck(rl._bwd_op, (torch.randn(9), residual, hidden.detach(), weight.detach(),
                                       b.detach(), target, True, True, True, True))


def test_compiles_without_graph_breaks(seed):
    hidden, weight, b, target, tw = make_inputs(13, 20, 4, bias=True, token_weight=True)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(h, w, bb, t, weights):
        return rl._triton(h, w, t, bias=bb, token_weight=weights)

    out = step(hidden, weight, b, target, tw)
    ref, ref_grads = float64_oracle(hidden, weight, target, b, tw, "mean", torch.ones(()))
    assert_rel(out, ref, 1e-5, "compiled loss")
    dh, = torch.autograd.grad(out, [hidden])
    assert_rel(dh, ref_grads["hidden"], 1e-5, "compiled dhidden")


# ------------------------------------------------------------------ GPU lane
def _flash_rule(dtype, reduction, n=16384, h=1536, c=16, floor=1e-6):
    """Fused error to fp64 <= 2x the same-dtype reference's error + floor, for the loss
    and every gradient (DESIGN.md 4)."""
    hidden, weight, b, target, tw = make_inputs(n, h, c, dtype=dtype, bias=True,
                                                token_weight=True, device="cuda")
    leaves = [hidden, weight, b]
    out = uf.regression_loss(hidden, weight, target, bias=b, token_weight=tw,
                             reduction=reduction, impl="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref = reference_loss(hidden, weight, target, bias=b, token_weight=tw, reduction=reduction)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    exact, exact_grads = float64_oracle(hidden, weight, target, b, tw, reduction, grad_out)
    pairs = [("loss", out, ref, exact)] + [
        (f"d{k}", g, rg, exact_grads[k]) for k, g, rg in zip(("hidden", "weight", "bias"),
                                                            grads, ref_grads)]
    for name, fused, plain, truth in pairs:
        assert torch.isfinite(fused).all(), f"{name}: non-finite"
        e_fused, e_plain = rel_err(fused, truth), rel_err(plain, truth)
        assert e_fused <= 2 * e_plain + floor, \
            f"{dtype} {reduction} {name}: fused err {e_fused:.3e} > 2 x reference {e_plain:.3e} + {floor}"


@pytest.mark.gpu
@pytest.mark.skipif(reference_loss is None, reason=_REFERENCE_MISSING or "reference present")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_flash_rule_at_training_shape(seed, dtype, reduction):
    _flash_rule(dtype, reduction)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(4099, 1000, 16), (777, 3584, 100), (1, 64, 4)])
def test_gpu_fp32_and_odd_shapes(seed, poison, case):
    n, h, c = case
    inputs = make_inputs(n, h, c, bias=True, token_weight=True, device="cuda")
    run_and_check(*inputs, reduction="mean", tol=1e-5, grad_tol=1e-5)
    inputs = make_inputs(n, h, c, dtype=torch.bfloat16, bias=True, device="cuda")
    run_and_check(*inputs, reduction="sum", tol=1e-5, grad_tol=1e-2)


@pytest.mark.gpu
def test_gpu_no_host_sync(seed):
    hidden, weight, b, target, tw = make_inputs(4096, 256, 16, dtype=torch.bfloat16, bias=True,
                                                token_weight=True, device="cuda")
    uf.regression_loss(hidden, weight, target, bias=b, token_weight=tw, impl="triton").backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = uf.regression_loss(hidden, weight, target, bias=b, token_weight=tw, impl="triton")
        out.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
