"""Interpreter calls at least INTERPRETER_BIG_TILES_FROM rows / tokens long take big tiles
(the trainer's CPU default depends on it for speed): they must be exactly as right as
the 16-wide tiles the other tests use."""
import importlib

import pytest
import torch

import unimrg_fast as uf
from numerics import assert_rel
from unimrg_fast import backends

# importlib: unimrg_fast.ops re-exports the functions under the modules' names.
lce_mod = importlib.import_module("unimrg_fast.ops.linear_cross_entropy")
attn_mod = importlib.import_module("unimrg_fast.ops.packed_attention")
reg_mod = importlib.import_module("unimrg_fast.ops.regression_loss")

pytestmark = pytest.mark.skipif(not backends.triton_interpreted(),
                                reason="interpreter tile sizes only matter on the CPU lane")


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    first = out[0] if isinstance(out, tuple) else out
    (first * torch.linspace(0.5, 1.5, first.numel()).reshape(first.shape)).sum().backward()
    return first.detach(), [x.grad for x in leaves]


def test_attention_big_tiles(seed):
    t = attn_mod.INTERPRETER_BIG_TILES_FROM + 45
    assert attn_mod._pick_config(torch.float32, 16, True, t).fwd_block_m > 16
    layout = uf.PackedLayout.from_spans(
        [[(70, "full"), (9, "causal"), (64, "noise")], [(100, "full"), (23, "causal")]], pad_to=t)
    q, k, v = torch.randn(t, 4, 16), torch.randn(t, 2, 16), torch.randn(t, 2, 16)
    fused = _grads(lambda *x: uf.packed_attention(*x, layout, impl="triton"), q, k, v)
    plain = _grads(lambda *x: uf.packed_attention(*x, layout, impl="reference"), q, k, v)
    assert_rel(fused[0], plain[0], 1e-5, "out")
    for name, a, b in zip("qkv", fused[1], plain[1]):
        assert_rel(a, b, 1e-5, f"d{name}")


def test_linear_cross_entropy_big_tiles(seed):
    n = lce_mod.INTERPRETER_BIG_TILES_FROM + 37
    assert lce_mod._pick_config(torch.float32, True, n).block_m > 16
    h, w = torch.randn(n, 40) * 0.3, torch.randn(203, 40) * 0.3
    y = torch.randint(0, 203, (n,))
    y[::5] = -100
    fused = _grads(lambda h, w: uf.linear_cross_entropy(h, w, y, impl="triton", reduction="none",
                                                         label_smoothing=0.1), h, w)
    plain = _grads(lambda h, w: uf.linear_cross_entropy(h, w, y, impl="reference",
                                                         reduction="none", label_smoothing=0.1), h, w)
    assert_rel(fused[0], plain[0], 1e-5, "loss")
    for name, a, b in zip(("dhidden", "dweight"), fused[1], plain[1]):
        assert_rel(a, b, 1e-5, name)


def test_regression_big_tiles(seed):
    n = reg_mod.INTERPRETER_BIG_TILES_FROM + 21
    h, w, t = torch.randn(n, 40), torch.randn(12, 40) * 0.2, torch.randn(n, 12)
    assert reg_mod._pick_config(h, w, 12, True).block_n > 16
    fused = _grads(lambda h, w: uf.regression_loss(h, w, t, impl="triton", reduction="none"), h, w)
    plain = _grads(lambda h, w: uf.regression_loss(h, w, t, impl="reference", reduction="none"), h, w)
    assert_rel(fused[0], plain[0], 1e-5, "loss")
    for name, a, b in zip(("dhidden", "dweight"), fused[1], plain[1]):
        assert_rel(a, b, 1e-5, name)


def test_decoder_ops_big_tiles(seed):
    """RMSNorm, SwiGLU and rotary at calls big enough for the interpreter's whole-call
    tiles, with ragged row / token / column counts, against the reference twins."""
    rms_mod = importlib.import_module("unimrg_fast.ops.rms_norm")
    swiglu_mod = importlib.import_module("unimrg_fast.ops.swiglu")
    rotary_mod = importlib.import_module("unimrg_fast.ops.rotary")
    n, h = 1031, 72
    assert rms_mod._tiles(h, n, True)[0] > rms_mod._tiles(h)[0]
    x, w = torch.randn(n, h), torch.rand(h) + 0.5
    fused = _grads(lambda x, w: uf.rms_norm(x, w, impl="triton"), x, w)
    plain = _grads(lambda x, w: uf.rms_norm(x, w, impl="reference"), x, w)
    assert_rel(fused[0], plain[0], 1e-5, "rms_norm y")
    for name, a, b in zip(("dx", "dw"), fused[1], plain[1]):
        assert_rel(a, b, 1e-5, f"rms_norm {name}")

    gate, up = torch.randn(n, 200), torch.randn(n, 200)
    assert swiglu_mod._pick_config(n, 200, True).block_n > swiglu_mod._pick_config(n, 200, False).block_n
    fused = _grads(lambda g, u: uf.swiglu(g, u, impl="triton"), gate, up)
    plain = _grads(lambda g, u: uf.swiglu(g, u, impl="reference"), gate, up)
    assert_rel(fused[0], plain[0], 1e-5, "swiglu y")
    for name, a, b in zip(("dgate", "dup"), fused[1], plain[1]):
        assert_rel(a, b, 1e-5, f"swiglu {name}")

    q = torch.randn(1, n, 3, 24).transpose(1, 2)
    cos, sin = torch.randn(1, n, 24), torch.randn(1, n, 24)
    assert rotary_mod._pick_tiles(1, n, 12, q.device, True)[0] > 64
    fused = _grads(lambda q: uf.rotary_embedding(q, cos, sin, impl="triton"), q)
    plain = _grads(lambda q: uf.rotary_embedding(q, cos, sin, impl="reference"), q)
    assert_rel(fused[0], plain[0], 1e-5, "rotary y")
    assert_rel(fused[1][0], plain[1][0], 1e-5, "rotary dq")
