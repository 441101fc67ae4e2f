"""The decoder-op benchmarks' own code (benchmarks/test_bench_decoder_ops.py), run once at
tiny sizes on the CPU: every builder, the eager and fused callables (the fused ones on the
Triton interpreter), the output check against fp32, and the decoder-layer step with and
without uf.hf.fuse_decoder_ops, so the file is known to work before a GPU is lent. The
peers (torch.compile, Liger-Kernel) need a GPU and are not run here.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from numerics import assert_rel
from unimrg_fast import backends

_spec = importlib.util.spec_from_file_location(
    "bench_decoder_ops",
    Path(__file__).resolve().parents[1] / "benchmarks" / "test_bench_decoder_ops.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench   # dataclasses look their module up while being defined
_spec.loader.exec_module(bench)

pytestmark = pytest.mark.skipif(not backends.triton().available,
                                reason=f"Triton cannot run here: {backends.triton().detail}")


def cases():
    return {"rms_norm": bench.make_rms_norm_case(9, 40, device="cpu"),
            "swiglu": bench.make_swiglu_case(9, 56, device="cpu"),
            "rotary": bench.make_rotary_case(9, 3, 1, 16, device="cpu")}


@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "rotary"])
def test_eager_and_fused_steps_run_check_and_agree(op):
    case = cases()[op]
    results = {}
    for variant in ("eager", "fused"):
        out = bench.op_step(case, bench.op_fn(op, variant))()
        n_out = len(case.grad_out)
        bench.check_outputs(op, variant, out[:n_out], bench.fp32_outputs(op, case))
        assert len(out) == n_out + len(case.inputs)
        for k, g in enumerate(out[n_out:]):
            assert torch.isfinite(g).all() and g.abs().sum() > 0, f"{op} {variant} grad {k}"
        results[variant] = out
    for k, (a, b) in enumerate(zip(results["fused"], results["eager"])):
        assert_rel(a.float(), b.float(), 2e-2, f"{op} fused vs eager, output / grad {k}")


def test_the_output_check_catches_a_wrong_op():
    case = cases()["swiglu"]
    with pytest.raises(AssertionError, match="output rel err"):
        bench.check_outputs("swiglu", "broken", (case.inputs[1].detach(),),
                            bench.fp32_outputs("swiglu", case))


def test_a_peer_that_writes_into_its_inputs_is_checked_against_what_it_was_given(monkeypatch):
    """Liger's SwiGLU backward stores dgate / dup in its inputs: the reference must come
    from the inputs as they were, or a right peer fails the slice."""
    class InPlaceSwiGLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gate, up):
            ctx.save_for_backward(gate, up)
            return torch.nn.functional.silu(gate) * up

        @staticmethod
        def backward(ctx, dy):
            gate, up = ctx.saved_tensors
            s = torch.sigmoid(gate)
            dgate, dup = dy * up * s * (1 + gate * (1 - s)), dy * gate * s
            gate.data.copy_(dgate)
            up.data.copy_(dup)
            return gate.data.clone(), up.data.clone()

    monkeypatch.setattr(bench, "op_fn", lambda op, variant: InPlaceSwiGLU.apply)
    timed = []
    case = cases()["swiglu"]
    bench._bench_op(lambda step, **kw: timed.append(kw["variant"]), "swiglu", "liger", case,
                    nbytes=1.0)
    assert timed == ["liger"]


def test_decoder_layer_steps_agree_with_and_without_the_fused_ops():
    shape = dict(h=48, inter=72, heads=4, kv_heads=2, head_dim=12)
    outs = {}
    for fused in (False, True):
        layer, rotary = bench.make_decoder_layer(**shape, fused=fused, device="cpu")
        outs[fused] = bench.decoder_layer_step(layer, rotary, 11, shape["h"], device="cpu")()
    for k, (a, b) in enumerate(zip(outs[True], outs[False])):
        assert_rel(a, b, 1e-5, f"decoder layer output / grad {k}")
