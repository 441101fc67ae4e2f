"""Fused SwiGLU y = silu(gate) * up (the Qwen2 / Llama MLP activation) against float64.

CPU lane: the Triton interpreter (conftest sets TRITON_INTERPRET=1), tiny odd shapes
and 4 x 32 tiles, fp32 and fp16 (bf16 too: the kernels upcast after loading). The
reference twin is held to the same float64 oracle. GPU lane (`gpu` marker): bf16 at
a Qwen2 MLP's shape against the reference within bf16 tolerance.
"""
import importlib

import pytest
import torch

from numerics import assert_rel, rel_err
from unimrg_fast.ops._common import as_rows

sw = importlib.import_module("unimrg_fast.ops.swiglu")
ref_module = importlib.import_module("unimrg_fast.reference.swiglu")
reference = ref_module.swiglu

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


# ------------------------------------------------------------------ helpers
def float64_oracle(gate, up, grad_out):
    """(y, dgate, dup) in float64, written out: s = 1 / (1 + e^-g), y = g s u,
    dgate = dy u s (1 + g (1 - s)), dup = dy g s."""
    g, u = gate.detach().double(), up.detach().double()
    dy = grad_out.detach().double()
    s = 1.0 / (1.0 + torch.exp(-g))
    return g * s * u, dy * u * s * (1.0 + g * (1.0 - s)), dy * g * s


def make_inputs(shape, dtype=torch.float32, up_dtype=None, device="cpu", scale=2.0):
    # scale 2: gates reach well into both tails of the sigmoid
    gate = (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_()
    up = torch.randn(shape, device=device).to(up_dtype or dtype).requires_grad_()
    return gate, up


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an unwritten element fails."""
    def full_of_nan(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(sw, "_empty", full_of_nan)


def run_and_check(fn, gate, up, *, tol, grad_tol, out_dtype=None, grad_out=None):
    """fn(gate, up) forward + backward (for the inputs that require grad) against the
    float64 oracle, with a random upstream gradient; returns (y, grads)."""
    y = fn(gate, up) if out_dtype is None else fn(gate, up, out_dtype=out_dtype)
    want_dtype = out_dtype or torch.promote_types(gate.dtype, up.dtype)
    assert y.dtype == want_dtype and y.shape == gate.shape
    grad_out = torch.randn(y.shape, device=y.device).to(y.dtype) if grad_out is None else grad_out
    exact, dgate, dup = float64_oracle(gate, up, grad_out)
    assert_rel(y, exact, tol, "y")
    named = [(t, name, want) for t, name, want in ((gate, "gate", dgate), (up, "up", dup))
             if t.requires_grad]
    grads = torch.autograd.grad(y, [t for t, _, _ in named], grad_out) if named else ()
    for (t, name, want), got in zip(named, grads):
        assert got.dtype == t.dtype and got.shape == t.shape, f"d{name}: {got.dtype} {got.shape}"
        assert_rel(got, want, grad_tol, f"d{name}")
    return y, grads


BOTH = [pytest.param(sw._triton, id="triton"), pytest.param(reference, id="reference")]

# ------------------------------------------------------------------ CPU lane
SHAPES = [(1, 5), (7, 24), (37, 100), (3, 130), (2, 3, 37), (130,), (5, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fn", BOTH)
def test_fp32_matches_float64(seed, poison, fn, shape):
    run_and_check(fn, *make_inputs(shape), tol=1e-5, grad_tol=1e-5)


@pytest.mark.parametrize("shape", [(37, 100), (2, 3, 37)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fn", BOTH)
def test_fp16_matches_float64(seed, poison, fn, shape):
    # one fp16 rounding of the fused result; the reference's extra rounding of silu(gate)
    # also stays within 2e-3
    run_and_check(fn, *make_inputs(shape, torch.float16), tol=2e-3, grad_tol=2e-3)


@pytest.mark.parametrize("fn", BOTH)
def test_bf16_matches_float64(seed, poison, fn):
    run_and_check(fn, *make_inputs((19, 70), torch.bfloat16), tol=1e-2, grad_tol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fused_output_is_rounded_once_to_nearest(seed, poison, dtype):
    # fp32 math then one rounding: the output is the float64 value rounded to nearest,
    # up to rare double roundings. (The interpreter truncates fp32 to bf16 inside a
    # kernel, so interpreted bf16 is stored in fp32 and rounded outside.)
    gate, up = make_inputs((40, 96), dtype)
    y = sw._triton(gate, up)
    exact, _, _ = float64_oracle(gate, up, torch.ones(()))
    same = (y == exact.to(dtype)).float().mean().item()
    assert same >= 0.99, f"only {same:.1%} equal the round-to-nearest of float64"
    for name, grad, want in zip(("dgate", "dup"), torch.autograd.grad(y.sum(), [gate, up]),
                                float64_oracle(gate, up, torch.ones(()))[1:]):
        same = (grad == want.to(dtype)).float().mean().item()
        assert same >= 0.99, f"{name}: only {same:.1%} equal round-to-nearest"


def test_fused_bf16_is_no_less_accurate_than_the_reference(seed, poison):
    # one rounding against the eager formula's two (silu(gate) is rounded to bf16 first):
    # at 8K elements the fused error to float64 is ~0.7x the reference's, never above it
    gate, up = make_inputs((64, 128), torch.bfloat16)
    grad_out = torch.randn(64, 128).bfloat16()
    truth = float64_oracle(gate, up, grad_out)
    results = {}
    for name, fn in (("fused", sw._triton), ("reference", reference)):
        y = fn(gate, up)
        results[name] = (y,) + torch.autograd.grad(y, [gate, up], grad_out)
    for k, what in enumerate(("y", "dgate", "dup")):
        e_fused = rel_err(results["fused"][k], truth[k])
        e_ref = rel_err(results["reference"][k], truth[k])
        assert e_fused <= e_ref, f"{what}: fused err {e_fused:.3e} > reference err {e_ref:.3e}"


@pytest.mark.parametrize("gate_dtype,up_dtype,out", [
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, torch.bfloat16, torch.float32),   # promote_types(fp16, bf16) = fp32
    (torch.float32, torch.float16, torch.float32),
], ids=["bf16-fp32", "fp16-bf16", "fp32-fp16"])
@pytest.mark.parametrize("fn", BOTH)
def test_mixed_dtypes_promote(seed, poison, fn, gate_dtype, up_dtype, out):
    gate, up = make_inputs((9, 45), gate_dtype, up_dtype)
    y, (dgate, dup) = run_and_check(fn, gate, up, tol=1e-2, grad_tol=1e-2)
    assert y.dtype == out and dgate.dtype == gate_dtype and dup.dtype == up_dtype


def test_mixed_dtypes_fused_is_fp32_exact(seed, poison):
    # the kernel upcasts both inputs: with an fp32 output, the only error is fp32 math
    gate, up = make_inputs((9, 45), torch.bfloat16, torch.float32)
    y = sw._triton(gate, up)
    assert_rel(y, float64_oracle(gate, up, torch.ones(()))[0], 1e-5, "y")


@pytest.mark.parametrize("in_dtype,out_dtype,tol,ref_tol", [
    # fused: fp32 math rounded once to out_dtype; the reference computes in the inputs'
    # dtype and casts that result
    (torch.float16, torch.float32, 1e-5, 2e-3),
    (torch.float32, torch.bfloat16, 1e-2, 1e-2),
    (torch.float32, torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, torch.float16, 2e-3, 1e-2),
], ids=["fp16-to-fp32", "fp32-to-bf16", "fp32-to-fp16", "bf16-to-fp16"])
@pytest.mark.parametrize("fn", BOTH)
def test_out_dtype(seed, poison, fn, in_dtype, out_dtype, tol, ref_tol):
    gate, up = make_inputs((11, 40), in_dtype)
    tol = ref_tol if fn is reference else tol
    grad_tol = 1e-5 if in_dtype == torch.float32 else 1e-2
    _, (dgate, dup) = run_and_check(fn, gate, up, tol=tol, grad_tol=grad_tol,
                                    out_dtype=out_dtype)
    assert dgate.dtype == dup.dtype == in_dtype


def test_fused_gate_up_halves_are_read_in_place(seed, poison):
    # The common layout: gate and up are the two halves of one [N, 2I] projection, rows
    # strided by 2I. They are passed to the kernel as views, not copies.
    gate_up = (torch.randn(2, 13, 2 * 70) * 2).requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    for t in (gate, up):
        rows = as_rows(t)
        assert rows.data_ptr() == t.data_ptr() and rows.stride() == (140, 1)
    y = sw._triton(gate, up)
    grad_out = torch.randn_like(y)
    exact, dgate, dup = float64_oracle(gate, up, grad_out)
    assert_rel(y, exact, 1e-5, "y")
    dgu, = torch.autograd.grad(y, [gate_up], grad_out)
    assert_rel(dgu, torch.cat([dgate, dup], dim=-1), 1e-5, "d(gate_up)")


@pytest.mark.parametrize("layout", ["transposed", "permuted", "column-step", "expanded-rows"])
@pytest.mark.parametrize("fn", BOTH)
def test_non_contiguous_inputs(seed, poison, fn, layout):
    if layout == "transposed":      # unit stride on the wrong dim: copied
        gate = (torch.randn(24, 17) * 2).t()
        up = torch.randn(24, 17).t()
    elif layout == "permuted":      # leading dims that do not collapse to one stride: copied
        gate = (torch.randn(5, 3, 33) * 2).transpose(0, 1)
        up = torch.randn(3, 5, 33)
    elif layout == "column-step":   # every other column: copied
        gate = (torch.randn(9, 2 * 21) * 2)[:, ::2]
        up = torch.randn(9, 3 * 21)[:, ::3]
    else:                           # one row broadcast to 6 (row stride 0): read in place
        gate = (torch.randn(1, 50) * 2).expand(6, 50)
        up = torch.randn(6, 50)
    gate, up = gate.requires_grad_(), up.requires_grad_()
    run_and_check(fn, gate, up, tol=1e-5, grad_tol=1e-5)


def test_as_rows_copies_only_what_it_must():
    x = torch.randn(4, 6, 10)
    # leading dims that collapse to one row stride: views
    for view, row_stride in ((x, 10), (x[1:3], 10), (x[:, :, :5], 10), (x[:, 2:3], 60)):
        rows = as_rows(view)
        assert rows.data_ptr() == view.data_ptr(), view.shape
        assert rows.stride() == (row_stride, 1), view.shape
    for gappy in (x[:, 1:5], x[:, :3, :5], x[::2]):    # rows not evenly strided: copies
        rows = as_rows(gappy)
        assert rows.is_contiguous() and torch.equal(rows, gappy.reshape(rows.shape))
    assert as_rows(x.transpose(0, 1)).is_contiguous()
    assert as_rows(x[:, :, 3:4]).data_ptr() == x[:, :, 3:4].data_ptr()  # I = 1: any stride
    assert as_rows(torch.randn(1, 1, 7)).shape == (1, 7)


@pytest.mark.parametrize("wrt", ["gate", "up", "none"])
def test_each_gradient_alone(seed, poison, wrt):
    gate, up = make_inputs((13, 29))
    gate.requires_grad_(wrt == "gate")
    up.requires_grad_(wrt == "up")
    y, grads = run_and_check(sw._triton, gate, up, tol=1e-5, grad_tol=1e-5)
    assert len(grads) == (wrt != "none") and y.requires_grad == (wrt != "none")


def test_backward_of_a_sum_takes_an_expanded_gradient(seed, poison):
    # y.sum() sends back a stride-0 gradient: copied to rows before the kernel reads it
    gate, up = make_inputs((6, 35))
    dgate, dup = torch.autograd.grad(sw._triton(gate, up).sum(), [gate, up])
    _, want_g, want_u = float64_oracle(gate, up, torch.ones(6, 35))
    assert_rel(dgate, want_g, 1e-5, "dgate")
    assert_rel(dup, want_u, 1e-5, "dup")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter
def test_saturated_gates_stay_finite(poison):
    # sigmoid's tails: exp(-g) overflows fp32 for g < -88; silu -> -0, gradients -> 0
    gate = torch.tensor([[-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4]], requires_grad=True)
    up = torch.full_like(gate, 0.5).requires_grad_()
    y, grads = run_and_check(sw._triton, gate, up, tol=1e-6, grad_tol=1e-6,
                             grad_out=torch.ones_like(gate))
    assert all(torch.isfinite(t).all() for t in (y,) + tuple(grads))


@pytest.mark.parametrize("shape", [(0, 24), (4, 0), (2, 0, 5), (0,)],
                         ids=["no-rows", "no-columns", "empty-lead", "empty-1d"])
@pytest.mark.parametrize("fn", BOTH)
def test_empty_input(poison, fn, shape):
    gate, up = make_inputs(shape, torch.float16)
    y = fn(gate, up)
    assert y.shape == shape and y.dtype == torch.float16
    dgate, dup = torch.autograd.grad(y.float().sum(), [gate, up])
    assert dgate.shape == dup.shape == shape and dgate.dtype == dup.dtype == torch.float16


@pytest.mark.parametrize("shape", [(3, 2100), (5, 24), (70, 60)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_tiles_in_the_interpreter(seed, poison, monkeypatch, shape):
    # the tiles a GPU would take (1024-column blocks, several narrow rows per program),
    # checked here at shapes with ragged edges
    real = sw._pick_config
    monkeypatch.setattr(sw, "_pick_config", lambda n, width, interpreted: real(n, width, False))
    run_and_check(sw._triton, *make_inputs(shape), tol=1e-5, grad_tol=1e-5)


@pytest.mark.parametrize("n,width", [(1, 1), (1, 5), (16384, 18944), (4096, 4864), (7, 100000)])
def test_gpu_config_is_sane(n, width):
    cfg = sw._pick_config(n, width, interpreted=False)
    for block in (cfg.block_n, cfg.block_i):
        assert block >= 1 and block & (block - 1) == 0, f"{cfg}: blocks must be powers of 2"
    assert cfg.block_n * cfg.block_i <= 2048 and cfg.block_i <= 1024
    assert 1 <= cfg.num_warps <= 4
    rows, cols = sw._grid(n, width, cfg)
    assert rows < 2 ** 31 and cols <= 65535


def test_public_op_dispatches_to_triton(seed, monkeypatch):
    calls = []
    real = sw._forward
    monkeypatch.setattr(sw, "_forward", lambda *a: calls.append(1) or real(*a))
    gate, up = make_inputs((3, 10))
    y = sw.swiglu(gate, up, impl="triton")
    assert calls == [1] and y.shape == (3, 10)


def test_custom_ops_pass_opcheck(seed):
    # schema, fake kernels (shapes, dtypes and strides), autograd registration and AOT
    # dispatch of both ops, on contiguous rows and on the row-strided halves of a fused
    # gate_up projection, with both gradients and with each one alone
    gate, up = (t.detach() for t in make_inputs((7, 24)))
    torch.library.opcheck(sw._fwd_op, (gate.requires_grad_(), up.requires_grad_(),
                                       torch.float32))
    gate_up = torch.randn(5, 2 * 33) * 2
    half_g, half_u = gate_up.chunk(2, dim=-1)
    assert half_g.stride() == (66, 1)
    torch.library.opcheck(sw._fwd_op, (half_g, half_u, torch.bfloat16))
    torch.library.opcheck(sw._fwd_op, (gate.detach().half(), up.detach(), torch.float16))
    # rows the entry point makes of a permuted [..., I] input (a copy) and of a stacked
    # one whose rows are strided views
    permuted = sw.as_rows((torch.randn(5, 3, 16) * 2).transpose(0, 1))
    strided = sw.as_rows(torch.randn(3, 5, 32)[..., :16])
    assert strided.stride() == (32, 1)
    torch.library.opcheck(sw._fwd_op, (permuted.requires_grad_(), strided.requires_grad_(),
                                       torch.float32))
    gate, up = gate.detach(), up.detach()
    dy = torch.randn(7, 24)
    for need_dg, need_du in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(sw._bwd_op, (dy, gate, up, need_dg, need_du))
    torch.library.opcheck(sw._bwd_op, (torch.randn(5, 33), half_g, half_u.bfloat16(), True, False))
    torch.library.opcheck(sw._bwd_op, (torch.ones(()).expand(5, 33), half_g, half_u, False, True))


@pytest.mark.parametrize("layout", ["contiguous", "gate-up-halves"])
def test_public_op_traces_fullgraph(seed, layout):
    """The trainer compiles its step: swiglu must trace without graph breaks and give the
    eager result and gradients."""
    if layout == "contiguous":
        leaves = gate, up = make_inputs((2, 5, 37))
    else:
        gate_up = (torch.randn(2, 5, 2 * 37) * 2).requires_grad_()
        leaves = (gate_up,)
    grad_out = torch.randn(2, 5, 37)

    def inputs():
        return (gate, up) if layout == "contiguous" else gate_up.chunk(2, dim=-1)

    want = sw.swiglu(*inputs(), impl="triton")  # eager first, as a trainer's warm-up
    want_grads = torch.autograd.grad(want, leaves, grad_out)
    torch._dynamo.reset()
    fn = torch.compile(lambda g, u: sw.swiglu(g, u, impl="triton"), fullgraph=True,
                       backend="aot_eager")
    got = fn(*inputs())
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got, want)
    for g, w in zip(torch.autograd.grad(got, leaves, grad_out), want_grads):
        assert torch.equal(g, w)


def test_reference_is_hugging_faces_formula(seed):
    # HF: act_fn(gate_proj(x)) * up_proj(x), silu rounded to bf16 before the product;
    # act_fn is transformers' own "silu" activation
    from transformers.activations import ACT2FN

    gate, up = make_inputs((8, 64), torch.bfloat16)
    assert torch.equal(reference(gate, up), ACT2FN["silu"](gate) * up)


def test_reference_accepts_float64_as_an_oracle(seed):
    gate, up = make_inputs((6, 20), torch.float32, torch.float64)
    y = reference(gate, up)
    assert y.dtype == torch.float64
    # silu(gate) in float64, not fp32: as exact as the oracle
    assert_rel(y, float64_oracle(gate, up, torch.ones(()))[0], 1e-14, "float64 reference")


def _bad_calls():
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    return [
        (lambda f: f([1.0], u), TypeError, "gate must be a torch.Tensor"),
        (lambda f: f(g, "up"), TypeError, "up must be a torch.Tensor"),
        (lambda f: f(g.long(), u), TypeError, "gate must have dtype float32 / float16 / bfloat16"),
        (lambda f: f(g, u.int()), TypeError, "up must have dtype"),
        (lambda f: f(g, u[:, :7]), ValueError,
         r"up must have the same shape as gate \[\.\.\., I\]"),
        (lambda f: f(g, u[None]), ValueError, "up must have the same shape as gate"),
        (lambda f: f(torch.tensor(1.0), torch.tensor(2.0)), ValueError,
         "gate must have at least 1 dimension"),
        (lambda f: f(g, u.to("meta")), ValueError, "up must be on cpu"),
        (lambda f: f(g, u, out_dtype=torch.int32), TypeError, "out_dtype must be None .* or float32"),
        (lambda f: f(g, u, out_dtype="bf16"), TypeError, "out_dtype must be None .*, got 'bf16'"),
    ]


@pytest.mark.parametrize("fn", BOTH)
@pytest.mark.parametrize("call,exc,match", _bad_calls(), ids=lambda x: "" if callable(x) else None)
def test_bad_arguments_raise(fn, call, exc, match):
    with pytest.raises(exc, match=match):
        call(fn)


def test_fused_path_refuses_float64_and_cpu_without_interpreter(monkeypatch):
    g = torch.randn(4, 8)
    with pytest.raises(TypeError, match="up must have dtype float32 / float16 / bfloat16, "
                                        "got torch.float64"):
        sw._triton(g, g.double())
    with pytest.raises(TypeError, match="or float32 / float16 / bfloat16, got torch.float64"):
        sw._triton(g, g, out_dtype=torch.float64)
    with pytest.raises(ValueError, match="gate must be a CUDA tensor"):
        sw._triton(g.to("meta"), g.to("meta"))
    monkeypatch.setattr(sw.backends, "triton_interpreted", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sw._triton(g, g)


# ------------------------------------------------------------------ GPU lane
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 2048, 4864), (4096, 18944)], ids=["qwen2-0.5b", "qwen2-7b"])
def test_gpu_bf16_matches_reference_at_mlp_shape(seed, poison, shape):
    """bf16 at a Qwen2 MLP's intermediate size: the fused result and gradients agree with
    the reference within bf16 tolerance, and are no further from float64 than it."""
    gate, up = make_inputs(shape, torch.bfloat16, device="cuda")
    y = sw.swiglu(gate, up, impl="triton")
    want = reference(gate, up)
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, [gate, up], grad_out)
    ref_grads = torch.autograd.grad(want, [gate, up], grad_out)
    truth = float64_oracle(gate, up, grad_out)
    for name, fused, plain, exact in zip(("y", "dgate", "dup"), (y,) + grads,
                                         (want,) + ref_grads, truth):
        assert fused.dtype == torch.bfloat16
        assert_rel(fused, plain, 1e-2, f"{name} vs reference")
        e_fused, e_plain = rel_err(fused, exact), rel_err(plain, exact)
        assert e_fused <= 1.1 * e_plain + 1e-6, \
            f"{name}: fused err {e_fused:.3e} > reference err {e_plain:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 5), (37, 130), (4099, 11008), (3, 1, 100000)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_fp32_fp16_and_odd_shapes(seed, poison, shape):
    run_and_check(sw._triton, *make_inputs(shape, device="cuda"), tol=1e-5, grad_tol=1e-5)
    run_and_check(sw._triton, *make_inputs(shape, torch.float16, device="cuda"),
                  tol=2e-3, grad_tol=2e-3)
    gate_up = torch.randn(*shape[:-1], 2 * shape[-1], device="cuda", dtype=torch.bfloat16)
    gate, up = (t.requires_grad_() for t in gate_up.chunk(2, dim=-1))
    run_and_check(sw._triton, gate, up, tol=1e-2, grad_tol=1e-2, out_dtype=torch.float32)


@pytest.mark.gpu
def test_gpu_no_host_sync(seed):
    gate, up = make_inputs((4096, 4864), torch.bfloat16, device="cuda")
    sw.swiglu(gate, up, impl="triton").sum().backward()  # compiles outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sw.swiglu(gate, up, impl="triton").backward(torch.ones(4096, 4864, device="cuda",
                                                               dtype=torch.bfloat16))
    finally:
        torch.cuda.set_sync_debug_mode("default")
