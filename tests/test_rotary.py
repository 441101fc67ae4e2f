"""Fused rotary position embedding (HF Qwen2 / Llama rotate-half) against float64.

CPU lane: the Triton interpreter (conftest sets TRITON_INTERPRET=1), tiny odd shapes and
4-token blocks, fp32 and fp16 (bf16 too: the kernel upcasts after every load). Both the
Triton op and the reference twin are checked against an explicit float64 oracle, and
both against transformers' own apply_rotary_pos_emb. GPU lane (`gpu` marker): bf16 at a
Qwen2-sized shape against the reference. Both custom ops (unimrg_fast::rotary_fwd /
rotary_bwd) pass torch.library.opcheck, their fake kernels give the real strides, and
the public op traces under torch.compile(fullgraph=True).
"""
import importlib
import math

import pytest
import torch

from numerics import assert_rel, rel_err

rot = importlib.import_module("unimrg_fast.ops.rotary")
ref_mod = importlib.import_module("unimrg_fast.reference.rotary")
reference = ref_mod.rotary_embedding

CUDA = torch.cuda.is_available()
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# ------------------------------------------------------------------ helpers
def make_x(b, h, t, d, dtype=torch.float32, layout="bthd", device="cpu"):
    """x [B, H, T, D]: HF's transposed view of a [B, T, H, D] buffer ("bthd"), or a
    contiguous [B, H, T, D] tensor ("bhtd"). A leaf that requires grad."""
    if layout == "bthd":
        x = torch.randn(b, t, h, d, device=device).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(b, h, t, d, device=device).to(dtype)
    return x.requires_grad_()


def make_tables(shape, dtype=torch.float32, device="cpu"):
    """cos, sin of one independent random angle per position d: the two halves differ
    (HF's are cat(c, c)), so a kernel that reads one half for both fails."""
    theta = torch.rand(shape, device=device, dtype=torch.float64) * 2 * math.pi
    return theta.cos().to(dtype), theta.sin().to(dtype)


def table_shape(kind, b, t, d):
    return {"btd": (b, t, d), "1td": (1, t, d), "td": (t, d)}[kind]


def _as_4d(table):
    """[T, D] / [B, T, D] -> [B or 1, 1, T, D], broadcasting over the heads."""
    return (table[None] if table.dim() == 2 else table)[:, None]


def _sum_to(full, shape):
    """A [B, H, T, D] gradient summed over what cos / sin of `shape` broadcast over."""
    per_bt = full.sum(1)
    if len(shape) == 2:
        return per_bt.sum(0)
    return per_bt.sum(0, keepdim=True) if shape[0] == 1 else per_bt


def float64_oracle(x, cos, sin, grad_out):
    """y, dx, dcos, dsin in float64 on upcast inputs, written out per half (no autograd):
    y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2; dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1;
    dcos = sum_heads g x, dsin = sum_heads g cat(-x2, x1)."""
    x, g = x.detach().double(), grad_out.detach().double()
    c, s = _as_4d(cos.detach().double()), _as_4d(sin.detach().double())
    half = x.shape[-1] // 2
    x1, x2, g1, g2 = x[..., :half], x[..., half:], g[..., :half], g[..., half:]
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    y = torch.cat([x1 * c1 - x2 * s1, x2 * c2 + x1 * s2], -1)
    dx = torch.cat([g1 * c1 + g2 * s2, g2 * c2 - g1 * s1], -1)
    dcos = _sum_to(g * x, cos.shape)
    dsin = _sum_to(g * torch.cat([-x2, x1], -1), sin.shape)
    return y, dx, dcos, dsin


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the kernel writes starts as NaN, so an unwritten element fails."""
    def full_of_nan(shape, stride, dtype, device):
        return torch.empty_strided(shape, stride, dtype=dtype, device=device).fill_(float("nan"))

    monkeypatch.setattr(rot, "_empty", full_of_nan)


def check_triton(x, cos, sin, *, out_dtype=None, tol=None, grad_tol=None):
    """Triton forward + dx (random upstream gradient) against the float64 oracle."""
    y = rot._triton(x, cos, sin, out_dtype=out_dtype)
    want_dtype = out_dtype or torch.promote_types(x.dtype, cos.dtype)
    assert y.dtype == want_dtype and y.shape == x.shape
    grad_out = torch.randn(y.shape, device=y.device).to(y.dtype)
    dx, = torch.autograd.grad(y, [x], grad_out)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    y64, dx64, _, _ = float64_oracle(x, cos, sin, grad_out)
    assert_rel(y, y64, tol or TOL[y.dtype], "y (triton)")
    assert_rel(dx, dx64, grad_tol or TOL[x.dtype], "dx (triton)")
    return y, dx


# ------------------------------------------------------------------ CPU lane
CASES = [  # (B, H, T, D, cos / sin shape, x layout): ragged against 4-token blocks
    (2, 3, 37, 6, "btd", "bthd"),
    (1, 1, 1, 2, "td", "bhtd"),     # one token, one head, the smallest D
    (2, 3, 7, 16, "1td", "bthd"),   # HF's position_ids [1, T]: one table for the batch
    (1, 3, 37, 24, "btd", "bhtd"),  # D / 2 = 12: a masked 16-wide half tile
    (2, 1, 7, 128, "td", "bthd"),
    (3, 2, 5, 10, "btd", "bthd"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-T{}-D{}-{}-{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_float64(seed, poison, case, dtype):
    b, h, t, d, kind, layout = case
    x = make_x(b, h, t, d, dtype, layout)
    cos, sin = make_tables(table_shape(kind, b, t, d), dtype)
    check_triton(x, cos, sin)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-T{}-D{}-{}-{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_reference_matches_float64(seed, case, dtype):
    # the twin's gradients come from plain autograd, for cos and sin too
    b, h, t, d, kind, layout = case
    x = make_x(b, h, t, d, dtype, layout)
    cos, sin = (tab.requires_grad_() for tab in make_tables(table_shape(kind, b, t, d), dtype))
    y = reference(x, cos, sin)
    assert y.dtype == dtype and y.shape == x.shape
    grad_out = torch.randn(y.shape).to(dtype)
    grads = torch.autograd.grad(y, [x, cos, sin], grad_out)
    want = float64_oracle(x, cos, sin, grad_out)
    for name, got, exp in zip(("y", "dx", "dcos", "dsin"), (y,) + grads, want):
        assert got.dtype == dtype
        assert_rel(got, exp, TOL[dtype], f"{name} (reference)")


def test_reference_float64(seed):
    x = make_x(2, 3, 5, 8, torch.float64)
    cos, sin = make_tables((2, 5, 8), torch.float64)
    y = reference(x, cos, sin)
    assert y.dtype == torch.float64
    assert_rel(y, float64_oracle(x, cos, sin, torch.zeros_like(y))[0], 1e-14, "y (reference fp64)")


def test_bf16_rounds_once_to_nearest(seed, poison):
    # the kernel computes in fp32 and rounds once; in the interpreter bf16 outputs are
    # stored in fp32 and rounded outside (the interpreter would truncate)
    x = make_x(2, 3, 37, 24, torch.bfloat16)
    cos, sin = make_tables((2, 37, 24), torch.bfloat16)
    y, dx = check_triton(x, cos, sin)
    y64 = float64_oracle(x, cos, sin, torch.zeros_like(y))[0]
    exact = (y == y64.to(torch.bfloat16)).float().mean().item()
    assert exact >= 0.99, f"only {exact:.1%} of y equal the round-to-nearest bf16"


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp32_tables_promote_like_eager(seed, poison, x_dtype):
    # under autocast HF's cos / sin are fp32 and eager returns fp32 q / k; dx keeps x's dtype
    x = make_x(2, 3, 7, 16, x_dtype)
    cos, sin = make_tables((2, 7, 16))
    y, _ = check_triton(x, cos, sin, tol=1e-5)
    assert y.dtype == torch.float32 == reference(x, cos, sin).dtype


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
def test_out_dtype(seed, poison, out_dtype):
    x = make_x(1, 3, 37, 6, torch.float32 if out_dtype != torch.float32 else torch.float16)
    cos, sin = make_tables((37, 6), x.dtype)
    # dx rounds the out_dtype upstream gradient's exact fp32 rotation once to x's dtype
    check_triton(x, cos, sin, out_dtype=out_dtype, grad_tol=TOL[x.dtype])
    assert reference(x, cos, sin, out_dtype=out_dtype).dtype == out_dtype


def test_cos_halves_that_differ_are_each_read(seed, poison):
    # HF's tables repeat one half; these do not. A kernel that reads c1 / s1 for both
    # halves (or c2 / s2) would be far off here.
    b, h, t, d = 2, 3, 7, 16
    x = make_x(b, h, t, d)
    c1, s1 = make_tables((b, t, d // 2))
    c2, s2 = make_tables((b, t, d // 2))
    cos, sin = torch.cat([c1, c2], -1), torch.cat([s1, s2], -1)
    y, _ = check_triton(x, cos, sin)
    for wrong_cos, wrong_sin in ((torch.cat([c1, c1], -1), torch.cat([s1, s1], -1)),
                                 (torch.cat([c2, c2], -1), torch.cat([s2, s2], -1))):
        wrong = float64_oracle(x, wrong_cos, wrong_sin, torch.zeros_like(y))[0]
        assert rel_err(y, wrong) > 0.1


def test_hf_tables_with_equal_halves(seed, poison):
    # the real thing: cos = cat(c, c) from inv_freq and positions, [T, D] and [B, T, D]
    b, h, t, d = 2, 3, 37, 24
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.sort(torch.randint(0, 1000, (b, t)), dim=-1).values.float()
    emb = torch.cat([pos[..., None] * inv_freq] * 2, -1)
    x = make_x(b, h, t, d)
    check_triton(x, emb.cos(), emb.sin())
    check_triton(x, emb[0].cos(), emb[0].sin())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_transposed_view_gives_transposed_view(seed, poison, dtype):
    # x: [B, H, T, D] view of a [B, T, H, D] buffer, read in place; y and dx are views of
    # the same kind, so attention reads [T, H, D] rows without a copy
    b, h, t, d = 2, 3, 7, 16
    x = make_x(b, h, t, d, dtype, "bthd")
    cos, sin = make_tables((b, t, d), dtype)
    y, dx = check_triton(x, cos, sin)
    expected = (t * h * d, d, h * d, 1)
    assert x.stride() == expected
    assert y.stride() == expected and y.transpose(1, 2).is_contiguous()
    assert dx.stride() == expected and dx.transpose(1, 2).is_contiguous()


def test_contiguous_input_gives_contiguous_output(seed, poison):
    x = make_x(2, 3, 7, 16, layout="bhtd")
    cos, sin = make_tables((2, 7, 16))
    y, dx = check_triton(x, cos, sin)
    assert y.is_contiguous() and dx.is_contiguous()


def test_slice_of_fused_qkv_buffer(seed, poison):
    # q from a fused [B, T, 3 H D] projection: non-dense strides, read in place; the
    # output is dense in x's dimension order ([B, T, H, D] storage)
    b, h, t, d = 2, 3, 7, 16
    qkv = torch.randn(b, t, 3 * h * d)
    x = qkv[..., :h * d].view(b, t, h, d).transpose(1, 2).requires_grad_()
    cos, sin = make_tables((1, t, d))
    y, dx = check_triton(x, cos, sin)
    assert y.transpose(1, 2).is_contiguous() and dx.transpose(1, 2).is_contiguous()


def test_strided_last_dim_and_grad_out(seed, poison):
    # stride(-1) != 1 is not HF's layout; it is copied first, and must still be right
    x = torch.randn(2, 3, 5, 16)[..., ::2].requires_grad_()
    cos, sin = make_tables((5, 16))
    cos, sin = cos[:, ::2], sin[:, ::2]
    y = rot._triton(x, cos, sin)
    grad_out = torch.randn(2, 3, 5, 16)[..., ::2]
    dx, = torch.autograd.grad(y, [x], grad_out)
    y64, dx64, _, _ = float64_oracle(x, cos, sin, grad_out)
    assert_rel(y, y64, 1e-5, "y")
    assert_rel(dx, dx64, 1e-5, "dx")


@pytest.mark.parametrize("shape", [(2, 3, 0, 8), (2, 0, 5, 8), (0, 3, 5, 8)],
                         ids=["T0", "H0", "B0"])
def test_empty_input(poison, shape):
    b, h, t, d = shape
    x = make_x(b, h, t, d)
    cos, sin = make_tables((b, t, d))
    y = rot._triton(x, cos, sin)
    assert y.shape == shape and y.dtype == torch.float32
    dx, = torch.autograd.grad(y, [x], torch.ones_like(y))
    assert dx.shape == shape
    assert reference(x, cos, sin).shape == shape


def test_tables_requiring_grad_are_fine_without_grad_mode(seed, poison):
    # inference with tables that are parameters: nothing is differentiated
    x = make_x(1, 2, 7, 8).detach()
    cos, sin = (tab.requires_grad_() for tab in make_tables((7, 8)))
    with torch.no_grad():
        y = rot._triton(x, cos, sin)
    assert_rel(y, float64_oracle(x, cos, sin, torch.zeros_like(y))[0], 1e-5, "y")


def test_public_op_dispatches_to_triton(seed, monkeypatch):
    # the reference gives the same fp32 bits here, so count kernel launches instead
    x = make_x(1, 2, 5, 8)
    cos, sin = make_tables((5, 8))
    calls = []
    real = rot._rotate
    monkeypatch.setattr(rot, "_rotate", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = rot.rotary_embedding(x, cos, sin, impl="triton")
    assert calls == [1]
    assert_rel(y, float64_oracle(x, cos, sin, torch.zeros_like(y))[0], 1e-5, "y")


def test_interpreter_big_tiles(seed, poison):
    # calls of INTERPRETER_BIG_TILES_FROM (batch, token) rows take big token blocks
    b, h, t, d = 2, 2, rot.INTERPRETER_BIG_TILES_FROM // 2 + 19, 24
    assert rot._pick_tiles(b, t, d // 2, torch.device("cpu"), True)[0] > 4
    x = make_x(b, h, t, d)
    check_triton(x, *make_tables((b, t, d)))


def test_gpu_tile_choice(monkeypatch):
    # pure arithmetic on the shapes: ~4 waves of programs on 132 SMs, tiles of 256-1024
    monkeypatch.setattr(rot, "multiprocessors", lambda device: 132)
    gpu = torch.device("cuda")
    assert rot._pick_tiles(1, 4096, 64, gpu, False) == (4, 64, 1)    # B=1 prefill: 1024 programs
    assert rot._pick_tiles(8, 4096, 64, gpu, False) == (16, 64, 4)   # already 2048 programs
    assert rot._pick_tiles(1, 1, 64, gpu, False) == (1, 64, 1)
    assert rot._pick_tiles(4, 300, 3, gpu, False) == (64, 4, 1)      # D = 6: long token blocks


# ------------------------------------------------------ custom ops / torch.compile
def _fake_like(mode, *tensors):
    return [mode.from_tensor(t) for t in tensors]


LAYOUT_CASES = [  # (name, x maker): every kind of x the kernel reads in place or copies
    ("bthd", lambda: torch.randn(2, 7, 3, 16).transpose(1, 2)),
    ("bhtd", lambda: torch.randn(2, 3, 7, 16)),
    ("qkv_slice", lambda: torch.randn(2, 7, 3 * 3 * 16)[..., 3 * 16:6 * 16]
     .view(2, 7, 3, 16).transpose(1, 2)),
    ("strided_last", lambda: torch.randn(2, 3, 7, 32)[..., ::2]),
    ("one_head", lambda: torch.randn(2, 7, 1, 16).transpose(1, 2)),
    ("T0", lambda: torch.randn(2, 0, 3, 16).transpose(1, 2)),
    ("H0", lambda: torch.randn(2, 7, 0, 16).transpose(1, 2)),
    # dense, but D is not innermost: the output must still have unit-stride rows
    ("d_outer", lambda: torch.randn(2, 3, 16, 7).transpose(-1, -2)),
    ("expanded_heads", lambda: torch.randn(2, 1, 7, 16).expand(2, 3, 7, 16)),
]


@pytest.mark.parametrize("make", [m for _, m in LAYOUT_CASES], ids=[n for n, _ in LAYOUT_CASES])
def test_every_layout_matches_float64(seed, poison, make):
    x = make().requires_grad_()
    cos, sin = make_tables((x.shape[2], x.shape[3]))
    y, dx = check_triton(x, cos, sin)
    assert y.stride(-1) == 1 or y.shape[-1] <= 1


@pytest.mark.parametrize("make", [m for _, m in LAYOUT_CASES], ids=[n for n, _ in LAYOUT_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fake_kernels_give_the_real_layout(seed, poison, make, dtype):
    # what torch.compile traces with must be what runs: shape, dtype AND strides of y
    # and dx; and a dense x with unit-stride rows is kept as it is (torch.empty_like's
    # layout: the eager contract)
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = make().to(dtype)
    cos, sin = make_tables((x.shape[2], x.shape[3]), dtype)
    stride = list(rot._layout_of(x))
    if x.stride(-1) == 1 and rot._dense_and_non_overlapping(tuple(x.shape), x.stride()):
        assert tuple(stride) == x.stride() == torch.empty_like(x).stride()
    assert stride[-1] == 1 or x.shape[-1] <= 1
    y = rot._fwd_op(x, cos, sin, torch.float32)
    grad_out = torch.randn(y.shape).to(dtype)
    dx = rot._bwd_op(grad_out, cos, sin, dtype, stride)
    with FakeTensorMode() as mode:
        fx, fcos, fsin, fgrad = _fake_like(mode, x, cos, sin, grad_out)
        fy = rot._fwd_op(fx, fcos, fsin, torch.float32)
        fdx = rot._bwd_op(fgrad, fcos, fsin, dtype, stride)
    for name, real, fake in (("y", y, fy), ("dx", dx, fdx)):
        assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride()), name
    assert y.stride() == dx.stride() == tuple(stride)


@pytest.mark.parametrize("layout,dtype", [("bthd", torch.float32), ("bhtd", torch.float32),
                                          ("bthd", torch.bfloat16)],
                         ids=["bthd-fp32", "bhtd-fp32", "bthd-bf16"])
def test_custom_ops_pass_opcheck(seed, layout, dtype):
    # schema, fake kernels, autograd registration and AOT dispatch of both ops, on a
    # transposed [B, H, T, D] view of a [B, T, H, D] buffer and on a contiguous x
    x = make_x(2, 3, 5, 8, dtype, layout)
    cos, sin = make_tables((2, 5, 8), dtype)
    torch.library.opcheck(rot._fwd_op, (x, cos, sin, dtype))
    torch.library.opcheck(rot._fwd_op, (x, cos, sin, torch.float32))  # out_dtype != x's
    y = rot._fwd_op(x.detach(), cos, sin, dtype)
    grad_out = torch.randn_like(y)  # y's layout, as autograd hands it back
    stride = list(rot._layout_of(x))
    torch.library.opcheck(rot._bwd_op, (grad_out, cos, sin, dtype, stride))
    torch.library.opcheck(rot._bwd_op, (grad_out.contiguous(), cos, sin, dtype, stride))


@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_public_op_traces_fullgraph(seed, layout):
    """A trainer compiles its step: the rotary embedding must trace without graph breaks
    and give eager's y and dx, laid out the same way."""
    x = make_x(2, 3, 7, 16, layout=layout)
    cos, sin = make_tables((1, 7, 16))
    grad_out = torch.randn(x.shape)
    want = rot.rotary_embedding(x, cos, sin, impl="triton")  # eager first, as a warm-up
    want_dx, = torch.autograd.grad(want, [x], grad_out)
    torch._dynamo.reset()
    fn = torch.compile(lambda x: rot.rotary_embedding(x, cos, sin, impl="triton"),
                       fullgraph=True, backend="aot_eager")
    got = fn(x)
    got_dx, = torch.autograd.grad(got, [x], grad_out)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(got_dx, want_dx, rtol=1e-6, atol=1e-6)
    assert got.stride() == want.stride() == x.stride()
    assert got_dx.stride() == want_dx.stride() == x.stride()


def test_auto_takes_the_reference_for_tables_requiring_grad(seed, monkeypatch):
    """Where "auto" would take the kernel (a GPU; here the CPU preference is lifted), cos /
    sin that want a gradient go to the reference, which has dcos / dsin, instead of
    failing in the kernel's check; without grad mode, or with constant tables, the kernel."""
    import dataclasses

    from unimrg_fast import backends

    monkeypatch.setattr(backends, "_TABLE", [
        dataclasses.replace(i, prefer=None) if (i.op, i.name) == ("rotary_embedding", "triton")
        else i for i in backends._TABLE])
    calls = []
    real = rot._rotate
    monkeypatch.setattr(rot, "_rotate", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = make_x(1, 2, 5, 8).requires_grad_()
    cos, sin = (t.requires_grad_() for t in make_tables((5, 8)))
    grad_out = torch.randn(1, 2, 5, 8)
    y = rot.rotary_embedding(x, cos, sin)
    assert calls == []
    dx, dcos, dsin = torch.autograd.grad(y, [x, cos, sin], grad_out)
    want = float64_oracle(x.detach(), cos.detach(), sin.detach(), grad_out)
    for name, got, expected in zip(("y", "dx", "dcos", "dsin"), (y, dx, dcos, dsin), want):
        assert_rel(got, expected, 1e-5, f"{name} (auto, tables requiring grad)")
    with torch.no_grad():
        rot.rotary_embedding(x, cos, sin)
    rot.rotary_embedding(x, cos.detach(), sin.detach())
    assert calls == [1, 1]


def test_compiled_refuses_tables_requiring_grad(seed):
    # the check on cos / sin that ask for a gradient runs before the op, so it stays
    # under torch.compile: the trace stops at the raise and eager raises the ValueError
    x = make_x(1, 2, 5, 8)
    cos, sin = make_tables((5, 8))
    rot.rotary_embedding(x, cos, sin, impl="triton")  # eager first, as a warm-up
    cos.requires_grad_()
    torch._dynamo.reset()
    fn = torch.compile(lambda x: rot.rotary_embedding(x, cos, sin, impl="triton"),
                       backend="aot_eager")
    with pytest.raises(ValueError, match="cos / sin require grad.*impl='reference'"):
        fn(x)


# --------------------------------------------------------- transformers itself
@pytest.fixture
def qwen2_rope():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2 import modeling_qwen2

    config = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, max_position_embeddings=64, vocab_size=32,
                                      num_hidden_layers=1, intermediate_size=32)
    return modeling_qwen2.Qwen2RotaryEmbedding(config), modeling_qwen2.apply_rotary_pos_emb


@pytest.mark.parametrize("positions", ["per_sample", "shared"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_transformers_qwen2(seed, poison, qwen2_rope, positions, x_dtype):
    rope, apply_rotary_pos_emb = qwen2_rope
    b, t, d = 2, 6, 16
    q = make_x(b, 4, t, d, x_dtype)
    k = make_x(b, 2, t, d, x_dtype)
    pos = (torch.sort(torch.randint(0, 64, (b, t)), -1).values if positions == "per_sample"
           else torch.arange(t)[None])
    # fp32 tables, as HF builds them for an fp32 model or under autocast: bf16 q / k
    # then come out fp32, by eager's promotion
    cos, sin = rope(torch.zeros((), dtype=torch.float32), pos)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    for name, x, want in (("q", q, q_hf), ("k", k, k_hf)):
        got = rot._triton(x, cos, sin)
        assert got.dtype == want.dtype
        assert_rel(got, want, 1e-6, f"{name} vs transformers")
        assert torch.equal(reference(x, cos, sin), want), f"reference {name} != transformers"


# ------------------------------------------------------------------ errors
def _shared_bad_calls():
    x, cos, sin = torch.randn(2, 3, 5, 8), torch.randn(5, 8), torch.randn(5, 8)
    return [
        (lambda f: f([1.0], cos, sin), TypeError, "x must be a torch.Tensor"),
        (lambda f: f(x.long(), cos, sin), TypeError, "x must have dtype"),
        (lambda f: f(x[0], cos, sin), ValueError, "x must have 4 dimension"),
        (lambda f: f(torch.randn(2, 3, 5, 7), torch.randn(5, 7), torch.randn(5, 7)), ValueError,
         "x's last dimension .* must be even"),
        (lambda f: f(x, torch.randn(6, 8), sin), ValueError, r"cos must have shape \[B, T, D\]"),
        (lambda f: f(x, cos, torch.randn(5, 6)), ValueError, r"sin must have shape \[B, T, D\]"),
        (lambda f: f(x, torch.randn(3, 5, 8), torch.randn(3, 5, 8)), ValueError,
         r"cos must have shape \[B, T, D\] = \(2, 5, 8\)"),
        (lambda f: f(x, cos, torch.randn(2, 5, 8)), ValueError,
         "sin must have the same shape as cos"),
        (lambda f: f(x, cos, sin.half()), TypeError, "sin must have the same dtype as cos"),
        (lambda f: f(x, cos.int(), sin.int()), TypeError, "cos must have dtype"),
        (lambda f: f(x, cos.to("meta"), sin), ValueError, "cos must be on cpu"),
        (lambda f: f(x, cos, sin.to("meta")), ValueError, "sin must be on cpu"),
        (lambda f: f(x, cos, sin, out_dtype=torch.int64), TypeError, "out_dtype must be None .* or float32"),
        (lambda f: f(x, cos, sin, out_dtype="float16"), TypeError, "out_dtype must be None .* or float32"),
    ]


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("case", range(len(_shared_bad_calls())))
def test_bad_arguments_raise(impl, case):
    call, exc, match = _shared_bad_calls()[case]
    with pytest.raises(exc, match=match):
        call(rot._triton if impl == "triton" else reference)


def _triton_only_bad_calls():
    x, cos, sin = torch.randn(2, 3, 5, 8), torch.randn(5, 8), torch.randn(5, 8)
    return [
        (lambda: rot._triton(x.double(), cos, sin), TypeError,
         "x must have dtype float32 / float16 / bfloat16, got torch.float64"),
        (lambda: rot._triton(x, cos.double(), sin.double()), TypeError, "cos must have dtype"),
        (lambda: rot._triton(x, cos, sin, out_dtype=torch.float64), TypeError, "out_dtype must be"),
        (lambda: rot._triton(x, cos.requires_grad_(), sin), ValueError, "^cos requires grad"),
        (lambda: rot._triton(x, cos, sin.requires_grad_()), ValueError, "^sin requires grad"),
        (lambda: rot._triton(x, cos.requires_grad_(), sin.requires_grad_()), ValueError,
         "^cos and sin require grad"),
    ]


@pytest.mark.parametrize("case", range(len(_triton_only_bad_calls())))
def test_triton_only_bad_arguments_raise(case):
    call, exc, match = _triton_only_bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------ GPU lane
def _qwen2_tables(b, t, d, dtype, device):
    inv_freq = 1.0 / (1_000_000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    pos = torch.arange(t, device=device, dtype=torch.float32)[None].expand(b, t)
    emb = torch.cat([pos[..., None] * inv_freq] * 2, -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_bf16_at_qwen2_shape(seed, poison, table_dtype):
    # one Qwen2-1.5B layer's q at a 4k prefill; bf16 tables (a bf16 model) or fp32 (autocast)
    b, h, t, d = 1, 12, 4096, 128
    x = make_x(b, h, t, d, torch.bfloat16, device="cuda")
    cos, sin = _qwen2_tables(b, t, d, table_dtype, "cuda")
    y = rot.rotary_embedding(x, cos, sin, impl="triton")
    want = reference(x, cos, sin)
    assert y.dtype == want.dtype and y.stride() == x.stride()
    grad_out = torch.randn(y.shape, device="cuda").to(y.dtype)
    dx, = torch.autograd.grad(y, [x], grad_out)
    dx_ref, = torch.autograd.grad(want, [x], grad_out)
    assert_rel(y, want, TOL[torch.bfloat16], "y vs reference")
    assert_rel(dx, dx_ref, TOL[torch.bfloat16], "dx vs reference")
    # rounding once in fp32 is never worse than eager's three roundings
    y64, dx64, _, _ = float64_oracle(x, cos, sin, grad_out)
    assert rel_err(y, y64) <= 1.01 * rel_err(want, y64) + 1e-6
    assert rel_err(dx, dx64) <= 1.01 * rel_err(dx_ref, dx64) + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(3, 5, 1000, 96, "btd"), (1, 1, 1, 2, "td"),
                                  (2, 7, 333, 6, "1td")])
def test_gpu_fp32_odd_shapes(seed, poison, case):
    b, h, t, d, kind = case
    x = make_x(b, h, t, d, device="cuda")
    check_triton(x, *make_tables(table_shape(kind, b, t, d), device="cuda"))


@pytest.mark.gpu
def test_gpu_no_host_sync(seed):
    x = make_x(2, 12, 1024, 128, torch.bfloat16, device="cuda")
    cos, sin = _qwen2_tables(2, 1024, 128, torch.bfloat16, "cuda")
    rot.rotary_embedding(x, cos, sin, impl="triton").sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = rot.rotary_embedding(x, cos, sin, impl="triton")
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
