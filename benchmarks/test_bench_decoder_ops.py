"""The decoder's elementwise ops, forward + backward, side by side (DESIGN.md section 5).

    group                 variants (role)
    rms-norm-1.5b         eager (baseline) | torch.compile (peer) | fused | Liger-Kernel (peer)
    swiglu-1.5b           eager (baseline) | torch.compile (peer) | fused | Liger-Kernel (peer)
    rotary-1.5b           eager (baseline) | torch.compile (peer) | fused | Liger-Kernel (peer)
    decoder-layer-1.5b    Hugging Face Qwen2DecoderLayer (baseline) | with uf.hf.fuse_decoder_ops

Shapes are a 16k-token pack of Qwen2.5-1.5B (H 1,536, I 8,960, 12 q / 2 kv heads of 128)
as the trainer runs it: bf16 autocast over fp32 weights, so the norm reads the fp32
residual stream and its result goes to a bf16 matmul, and the rotary reads bf16 q / k
with fp32 cos / sin. Every variant returns what the next op consumes (bf16): the eager
norm and rotary return fp32, so their rows include the cast the next matmul does.
The layer group runs both variants with SDPA attention (identical in both), so the
difference is the norms, the MLP's activation and the rotary.

Each timed call is one forward and a backward of a fixed random gradient; the inputs'
gradients are dropped after it. Before timing, each variant's output is checked against
the fp32 value. Builders are reused on the CPU at tiny shapes by
tests/test_decoder_bench_builders.py.

Run: python -m pytest benchmarks/test_bench_decoder_ops.py --benchmark-only
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence, Tuple

import pytest
import torch

import unimrg_fast as uf
from unimrg_fast import backends

DTYPE = torch.bfloat16
OUT_RTOL = 2e-2           # every variant's output within 2% (relative norm) of fp32's
SHAPE = dict(t=16_384, h=1_536, inter=8_960, heads=12, kv_heads=2, head_dim=128)
VARIANTS = {"eager": "baseline", "compile": "peer", "fused": "fused", "liger": "peer"}
PEERS = ("compile", "liger")


@dataclasses.dataclass
class OpCase:
    """One op's inputs: `inputs` require grad, `grad_out` is the fixed output gradient."""
    inputs: Tuple[torch.Tensor, ...]
    consts: Tuple[torch.Tensor, ...]
    grad_out: Tuple[torch.Tensor, ...]


def _randn(shape, g, device, dtype, scale=1.0):
    return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)


def make_rms_norm_case(t: int, h: int, device="cuda", seed=0) -> OpCase:
    g = torch.Generator(device=device).manual_seed(seed)
    x = _randn((t, h), g, device, torch.float32, 2.0).requires_grad_()
    w = (1 + _randn((h,), g, device, torch.float32, 0.1)).requires_grad_()
    return OpCase((x, w), (), (_randn((t, h), g, device, DTYPE),))


def make_swiglu_case(t: int, inter: int, device="cuda", seed=0) -> OpCase:
    g = torch.Generator(device=device).manual_seed(seed)
    gate = _randn((t, inter), g, device, DTYPE, 2.0).requires_grad_()
    up = _randn((t, inter), g, device, DTYPE).requires_grad_()
    return OpCase((gate, up), (), (_randn((t, inter), g, device, DTYPE),))


def make_rotary_case(t: int, heads: int, kv_heads: int, head_dim: int, device="cuda",
                     seed=0) -> OpCase:
    """q, k as HF makes them: [1, H, T, D] views of the projections' [1, T, H, D] rows;
    cos / sin [1, T, D] fp32 (Qwen2RotaryEmbedding under autocast)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = _randn((1, t, heads, head_dim), g, device, DTYPE).transpose(1, 2).requires_grad_()
    k = _randn((1, t, kv_heads, head_dim), g, device, DTYPE).transpose(1, 2).requires_grad_()
    inv = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.arange(t, device=device).float()[:, None] * inv[None]
    emb = torch.cat([angles, angles], -1)[None]
    grads = tuple(_randn(x.shape, g, device, DTYPE) for x in (q, k))
    return OpCase((q, k), (emb.cos(), emb.sin()), grads)


# ------------------------------------------------------------------- implementations
def eager_rms_norm(x, w, eps=1e-6):
    """Qwen2RMSNorm's forward (the reference twin is its formula), then the cast the next
    (autocast) matmul does."""
    return uf.reference.rms_norm(x, w, eps=eps, out_dtype=DTYPE)


def eager_swiglu(gate, up):
    return uf.reference.swiglu(gate, up)   # HF's act_fn(gate) * up


def eager_rotary(q, k, cos, sin):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    q2, k2 = apply_rotary_pos_emb(q, k, cos, sin)
    return q2.to(DTYPE), k2.to(DTYPE)


def fused_rms_norm(x, w, eps=1e-6):
    return uf.rms_norm(x, w, eps=eps, out_dtype=DTYPE, impl="triton")


def fused_swiglu(gate, up):
    return uf.swiglu(gate, up, impl="triton")


def fused_rotary(q, k, cos, sin):
    return (uf.rotary_embedding(q, cos, sin, out_dtype=DTYPE, impl="triton"),
            uf.rotary_embedding(k, cos, sin, out_dtype=DTYPE, impl="triton"))


def _liger(op: str) -> Callable:
    """Liger-Kernel's function for `op` (liger-kernel 0.5 .. 0.8); skips when absent."""
    probe = backends.liger()
    if not probe.available:
        pytest.skip(f"Liger-Kernel peer: not available ({probe.detail})")
    try:
        if op == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            # casting_mode "llama" is Qwen2 / Llama's; in_place=False keeps dy intact
            return lambda x, w, eps=1e-6: LigerRMSNormFunction.apply(
                x, w, eps, 0.0, "llama", False).to(DTYPE)
        if op == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return LigerSiLUMulFunction.apply
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        return lambda q, k, cos, sin: tuple(y.to(DTYPE) for y in liger_rotary_pos_emb(q, k, cos, sin))
    except Exception as exc:
        pytest.skip(f"Liger-Kernel peer: liger_kernel {probe.version} lacks the {op} "
                    f"function this benchmark calls ({exc!r})")


EAGER = {"rms_norm": eager_rms_norm, "swiglu": eager_swiglu, "rotary": eager_rotary}
FUSED = {"rms_norm": fused_rms_norm, "swiglu": fused_swiglu, "rotary": fused_rotary}


def op_fn(op: str, variant: str) -> Callable:
    if variant == "eager":
        return EAGER[op]
    if variant == "fused":
        return FUSED[op]
    if variant == "compile":
        return torch.compile(EAGER[op], dynamic=False)
    if variant == "liger":
        return _liger(op)
    raise ValueError(f"unknown variant {variant!r}")


def _outputs(y) -> Tuple[torch.Tensor, ...]:
    return y if isinstance(y, tuple) else (y,)


def op_step(case: OpCase, fn: Callable) -> Callable[[], Tuple[torch.Tensor, ...]]:
    """One forward + backward of `fn`; returns (outputs detached..., input gradients...)."""
    def step():
        outs = _outputs(fn(*case.inputs, *case.consts))
        grads = torch.autograd.grad(outs, case.inputs, case.grad_out)
        return tuple(o.detach() for o in outs) + tuple(grads)

    return step


def fp32_outputs(op: str, case: OpCase) -> Tuple[torch.Tensor, ...]:
    with torch.no_grad():
        args = [x.float() for x in case.inputs] + list(case.consts)
        if op == "rms_norm":
            x, w = args
            return (w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6),)
        if op == "swiglu":
            gate, up = args
            return (torch.nn.functional.silu(gate) * up,)
        q, k, cos, sin = args

        def rot(x):
            half = x.shape[-1] // 2
            return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]
        return rot(q), rot(k)


def check_outputs(op: str, variant: str, got: Sequence[torch.Tensor],
                  expected: Sequence[torch.Tensor]) -> None:
    """got against fp32_outputs(op, case) taken BEFORE the variant ran: a peer may write
    into its inputs (Liger's SwiGLU backward stores dgate / dup in gate / up, its rotary
    rotates q / k in place), after which they would give another reference."""
    for y, want in zip(got, expected):
        err = float((y.float() - want).norm() / want.norm())
        assert err <= OUT_RTOL, f"{op} {variant}: output rel err {err:.3g} > {OUT_RTOL}"


def _bench_op(gpu_bench, op: str, variant: str, case: OpCase, nbytes: float) -> None:
    fn = op_fn(op, variant)
    step = op_step(case, fn)
    expected = fp32_outputs(op, case)
    try:
        got = step()
    except Exception as exc:
        if variant not in PEERS:
            raise
        pytest.skip(f"peer {variant!r} failed on this machine: {exc!r}")
    check_outputs(op, variant, got[:len(case.grad_out)], expected)
    del got, expected
    gpu_bench(step, role=VARIANTS[variant], variant=variant, min_bytes=nbytes, **SHAPE)


@pytest.mark.benchmark(group="rms-norm-1.5b")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bench_rms_norm(gpu_bench, variant):
    case = make_rms_norm_case(SHAPE["t"], SHAPE["h"])
    n = SHAPE["t"] * SHAPE["h"]
    # forward: read x (4 B), write y (2 B); backward: read x, dy, write dx (4 + 2 + 4 B)
    _bench_op(gpu_bench, "rms_norm", variant, case, nbytes=16.0 * n)


@pytest.mark.benchmark(group="swiglu-1.5b")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bench_swiglu(gpu_bench, variant):
    case = make_swiglu_case(SHAPE["t"], SHAPE["inter"])
    # forward: 2 reads, 1 write; backward: 3 reads, 2 writes (bf16)
    _bench_op(gpu_bench, "swiglu", variant, case, nbytes=16.0 * SHAPE["t"] * SHAPE["inter"])


@pytest.mark.benchmark(group="rotary-1.5b")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bench_rotary(gpu_bench, variant):
    s = SHAPE
    case = make_rotary_case(s["t"], s["heads"], s["kv_heads"], s["head_dim"])
    n = s["t"] * (s["heads"] + s["kv_heads"]) * s["head_dim"]
    _bench_op(gpu_bench, "rotary", variant, case, nbytes=8.0 * n)


# ------------------------------------------------------------------------- one layer
def make_decoder_layer(h: int, inter: int, heads: int, kv_heads: int, head_dim: int,
                       fused: bool, device="cuda", seed=0):
    """A Qwen2DecoderLayer with fp32 weights and SDPA attention, its rotary module, and
    whether uf.hf.fuse_decoder_ops swapped its ops (impl="triton")."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=h, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim, num_hidden_layers=1,
                      max_position_embeddings=32_768, rope_theta=1e6)
    cfg._attn_implementation = "sdpa"
    layer = Qwen2DecoderLayer(cfg, layer_idx=0).to(device)
    if fused:
        uf.hf.fuse_decoder_ops(layer, impl="triton")
    return layer, Qwen2RotaryEmbedding(cfg).to(device)


def decoder_layer_step(layer, rotary, t: int, h: int, device="cuda", seed=0):
    """One forward + backward of the layer over a [1, T, H] fp32 residual stream under bf16
    autocast (the trainer's setting); returns (output, dx, a weight gradient)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = _randn((1, t, h), g, device, torch.float32).requires_grad_()
    grad_out = _randn((1, t, h), g, device, torch.float32)
    positions = torch.arange(t, device=device)[None]
    with torch.no_grad():
        cos_sin = rotary(x, positions)
    params = [p for p in layer.parameters()]

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = layer(x, attention_mask=None, position_ids=positions,
                        position_embeddings=cos_sin)
        out = out[0] if isinstance(out, tuple) else out
        grads = torch.autograd.grad(out, [x] + params, grad_out)
        return out.detach(), grads[0], grads[1]

    return step


@pytest.mark.benchmark(group="decoder-layer-1.5b")
@pytest.mark.parametrize("variant", ["hf", "fused"])
def test_bench_decoder_layer(gpu_bench, variant):
    s = SHAPE
    layer, rotary = make_decoder_layer(s["h"], s["inter"], s["heads"], s["kv_heads"],
                                       s["head_dim"], fused=variant == "fused")
    step = decoder_layer_step(layer, rotary, s["t"], s["h"])
    if variant == "fused":   # the same layer's output with its own ops, for the check
        uf.hf.set_decoder_impl(layer, "reference")
        want = step()[0].float()
        uf.hf.set_decoder_impl(layer, "triton")
        got = step()[0].float()
        err = float((got - want).norm() / want.norm())
        assert err <= OUT_RTOL, f"fused decoder layer: output rel err {err:.3g} > {OUT_RTOL}"
    gpu_bench(step, role="baseline" if variant == "hf" else "fused", variant=variant, **s)
