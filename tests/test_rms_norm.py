"""Fused RMSNorm (unimrg_fast.ops.rms_norm) and its reference twin against float64.

CPU lane: the Triton interpreter (conftest), odd shapes, fp32 / fp16 / bf16 (bf16 tiles
are upcast as they load, so the interpreter runs it too). GPU lane (`gpu` marker): bf16 at
a 1.5B decoder's pack shape against the reference.
"""
import importlib

import pytest
import torch

from numerics import assert_rel
from unimrg_fast import backends
from unimrg_fast.reference.rms_norm import rms_norm as reference

rn = importlib.import_module("unimrg_fast.ops.rms_norm")
MAX_FUSED_HIDDEN = rn.MAX_FUSED_HIDDEN
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def oracle(x, weight, eps, grad_out):
    """y and the analytic gradients in float64, written out:
    y = w x r with r = (mean x^2 + eps)^-1/2; dx = r (w dy) - x r^3 mean(w dy x);
    dw = sum over rows of dy x r."""
    x64, w64, g = x.detach().double(), weight.detach().double(), grad_out.detach().double()
    r = ((x64 * x64).mean(-1, keepdim=True) + eps).rsqrt()
    wdy = w64 * g
    dx = r * wdy - x64 * r ** 3 * (wdy * x64).mean(-1, keepdim=True)
    dw = (g * x64 * r).reshape(-1, x64.shape[-1]).sum(0)
    return w64 * x64 * r, dx, dw


def make(shape, dtype, wdtype=torch.float32, device=DEVICE):
    x = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()
    w = (torch.rand(shape[-1], device=device) + 0.5).to(wdtype).requires_grad_()
    return x, w


def check_gradients(x, w, y, eps, tol_dx, tol_dw):
    """dx and dw of y (under a random output gradient in y's dtype) against the oracle;
    returns the oracle's y."""
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    want_y, want_dx, want_dw = oracle(x, w, eps, g)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    assert_rel(dx, want_dx, tol_dx, "dx")
    assert_rel(dw, want_dw, tol_dw, "dw")
    return want_y


def fused(x, w, **kw):
    return rn.rms_norm(x, w, impl="triton", **kw)


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(rn, "_empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))


@pytest.mark.parametrize("fn", [fused, reference], ids=["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 5), (7, 24), (2, 37, 100), (3, 130)])
def test_matches_float64(fn, dtype, shape, seed, poison):
    x, w = make(shape, dtype)
    eps = 1e-5
    y = fn(x, w, eps=eps)
    assert y.dtype == torch.promote_types(dtype, w.dtype) and y.shape == x.shape
    grad_out = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), grad_out)
    want_y, want_dx, want_dw = oracle(x, w, eps, grad_out)
    tol = TOL[dtype]
    # the kernel computes from the 16-bit rows in fp32 and rounds once, to y's / dw's
    # dtype; the reference (HF's formula) rounds the normalised rows to x's dtype first
    assert_rel(y, want_y, TOL[y.dtype] if fn is fused else tol, "y")
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    assert_rel(dx, want_dx, tol, "dx")
    assert_rel(dw, want_dw, TOL[dw.dtype] if fn is fused else tol, "dw")


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_out_dtype_rounds_once(out_dtype, seed, poison):
    """The decoder asks for the autocast dtype: the fused result is the fp32 value rounded
    once, i.e. what eager's fp32 norm followed by a cast gives."""
    x, w = make((9, 48), torch.float32)
    y = fused(x, w, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    want = reference(x, w).to(out_dtype)
    assert_rel(y, want, TOL[out_dtype] / 4, "y")
    if out_dtype != torch.float32:
        # rounded once to nearest from (nearly) the same fp32 value: the 16-bit results
        # agree almost everywhere (truncating, or rounding through another dtype, would not)
        assert (y == want).float().mean() >= 0.99
    # dy arrives in out_dtype; the backward reads it exactly and writes x's / w's dtype
    check_gradients(x, w, y, 1e-6, 2e-6, 2e-6)


def test_half_weight_and_fp32_rows(seed, poison):
    x, w = make((5, 33), torch.float32, wdtype=torch.float16)
    y = fused(x, w, eps=1e-6)
    assert y.dtype == torch.float32
    assert_rel(y, check_gradients(x, w, y, 1e-6, 1e-5, 2e-3), 1e-5, "y")


def test_strided_and_expanded_weights(seed, poison):
    # the kernels read the weight at unit stride; a column of a stacked [H, L] weight and
    # an expanded scalar were read wrongly (the expanded one past its end)
    x = (torch.randn(6, 40, device=DEVICE) * 3).requires_grad_()
    stacked = (torch.rand(40, 3, device=DEVICE) + 0.5).requires_grad_()
    scalar = (torch.rand((), device=DEVICE) + 0.5).requires_grad_()
    for w in (stacked[:, 1], scalar.expand(40)):
        assert not w.is_contiguous()
        y = fused(x, w)
        assert_rel(y, check_gradients(x, w, y, 1e-6, 2e-6, 2e-6), 2e-6, "y")


def test_strided_rows_are_read_in_place_and_transposed_ones_copied(seed, poison):
    base = torch.randn(11, 64, device=DEVICE)
    in_place = (base[:, :40], base[::2])              # row strides 64 and 128
    copied = (torch.randn(64, 11, device=DEVICE).t()[:, :40],)   # column stride 11
    for x in in_place + copied:
        assert (rn.as_rows(x).data_ptr() == x.data_ptr()) == (x.stride(-1) == 1)
        x = x.detach().requires_grad_()
        w = torch.rand(x.shape[-1], device=DEVICE).requires_grad_()
        y = fused(x, w)
        assert_rel(y, check_gradients(x, w, y, 1e-6, 2e-6, 2e-6), 2e-6, "y")


@pytest.mark.parametrize("wants", ["x", "weight"])
def test_one_gradient_only(wants, seed, poison):
    x, w = make((6, 20), torch.float32)
    x.requires_grad_(wants == "x")
    w.requires_grad_(wants == "weight")
    y = fused(x, w)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, (x if wants == "x" else w,), g)
    _, want_dx, want_dw = oracle(x, w, 1e-6, g)
    assert_rel(grad, want_dx if wants == "x" else want_dw, 2e-6, wants)


def test_many_rows_split_over_backward_programs(seed):
    """More row blocks than backward programs: each program walks several and dw is the
    fixed-order sum of their partials, the same bits on every call."""
    x, w = make((300, 16), torch.float32)
    block_n = rn._tiles(16, 300, backends.triton_interpreted())[0]
    assert triton_blocks(300, block_n) > rn._backward_programs(triton_blocks(300, block_n),
                                                              x.device)
    g = torch.randn(300, 16, device=DEVICE)
    dw1 = torch.autograd.grad(fused(x, w), w, g)[0]
    dw2 = torch.autograd.grad(fused(x, w), w, g)[0]
    assert torch.equal(dw1, dw2)
    assert_rel(dw1, oracle(x, w, 1e-6, g)[2], 2e-6, "dw")


def triton_blocks(n, block_n):
    return -(-n // block_n)


def test_empty_rows(poison):
    x, w = make((0, 12), torch.float32)
    y = fused(x, w)
    assert y.shape == (0, 12)
    dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert dx.shape == (0, 12) and torch.equal(dw, torch.zeros(12))


def test_zero_rows_stay_finite(poison):
    """mean x^2 = 0: eps keeps rstd finite, the output and gradients are finite."""
    x = torch.zeros(3, 10, requires_grad=True, device=DEVICE)
    w = torch.ones(10, requires_grad=True, device=DEVICE)
    y = fused(x, w, eps=1e-6)
    dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.isfinite(dx).all() and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("fn", [fused, reference], ids=["triton", "reference"])
def test_bad_arguments_are_named(fn):
    x, w = make((4, 8), torch.float32)
    with pytest.raises(TypeError, match="x must have dtype"):
        fn(x.detach().long(), w)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        fn(x, torch.ones(9))
    with pytest.raises(ValueError, match="weight must have 1 dimension"):
        fn(x, torch.ones(1, 8))
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        fn(x, w, eps=-1.0)
    with pytest.raises(TypeError, match="out_dtype must be None \\(the inputs' promoted dtype\\) or float32"):
        fn(x, w, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="weight must be on"):
        fn(x, w.detach().to("meta"))


def test_fused_refuses_float64_and_too_wide_rows():
    with pytest.raises(ValueError, match=r"float64 \(the kernels take fp32 / fp16 / bf16\)"):
        fused(torch.randn(2, 4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must have dtype"):
        rn._triton(torch.randn(2, 4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    wide = MAX_FUSED_HIDDEN + 1
    with pytest.raises(ValueError, match="a row must fit in registers"):
        fused(torch.randn(1, wide), torch.ones(wide))
    with pytest.raises(ValueError, match=fr"x.shape\[-1\] = {wide} > {MAX_FUSED_HIDDEN}"):
        rn._triton(torch.randn(1, wide), torch.ones(wide))
    assert "registers" in rn.triton_accepts(hidden=wide)
    assert rn.triton_accepts(hidden=4096) is None


def test_auto_and_reference_dispatch():
    x, w = make((3, 8), torch.float32)
    assert backends.resolve("rms_norm", "auto", device=x.device, hidden=8)[0] == (
        "triton" if CUDA else "reference")
    assert torch.equal(rn.rms_norm(x, w, impl="reference"), reference(x, w))


@pytest.mark.gpu
def test_gpu_bf16_decoder_shape(seed):
    """A 1.5B decoder's norm at a 16k pack: fp32 residual rows, bf16 output (autocast)."""
    x, w = make((16_384, 1_536), torch.float32)
    y = fused(x, w, out_dtype=torch.bfloat16)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    want_y, want_dx, want_dw = oracle(x, w, 1e-6, g)
    assert_rel(y, want_y, 1e-2, "y")
    assert_rel(dx, want_dx, 1e-2, "dx")
    assert_rel(dw, want_dw, 1e-2, "dw")
    dw_again = torch.autograd.grad(fused(x, w, out_dtype=torch.bfloat16), w, g)[0]
    assert torch.equal(dw, dw_again), "dw must be bitwise reproducible"


def test_custom_ops_pass_opcheck(seed):
    x, w = make((7, 24), torch.float32)
    rows = x.detach()
    torch.library.opcheck(rn._fwd_op, (rows, w.detach(), 1e-6, torch.float16))
    y, rstd = rn._fwd_op(rows, w.detach(), 1e-6, torch.float32)
    dy = torch.randn_like(y)
    for need_dx, need_dw in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(rn._bwd_op, (dy, rows, w.detach(), rstd, need_dx, need_dw))
    strided = torch.randn(7, 48)[:, :24]   # row stride 48: read in place
    torch.library.opcheck(rn._fwd_op, (strided, w.detach(), 1e-6, torch.float32))


def test_traces_fullgraph_under_torch_compile(seed):
    """A trainer compiles its step: the op must not graph-break."""
    x, w = make((5, 16), torch.float32)
    g = torch.randn(5, 16)
    want = torch.autograd.grad(fused(x, w, out_dtype=torch.float16), (x, w), g.half())
    torch._dynamo.reset()
    fn = torch.compile(lambda x, w: fused(x, w, out_dtype=torch.float16), fullgraph=True,
                       backend="aot_eager")
    y = fn(x, w)
    assert y.dtype == torch.float16
    got = torch.autograd.grad(y, (x, w), g.half())
    for a, b, name in zip(got, want, ("dx", "dw")):
        assert torch.equal(a, b), name
