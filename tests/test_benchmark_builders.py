"""The loss benchmarks' own code (benchmarks/test_bench_losses.py), run once at tiny sizes.

The benchmarks only run where a GPU is lent; this makes sure their builders and timed
callables work before then: every benchmarked callable runs once on the CPU in fp32
(the fused ones on the Triton interpreter), its loss and gradients are finite, and the
fused path matches the reference. The peers (torch.compile, Liger-Kernel, Cut
Cross-Entropy) are not run here: compiling on a CPU is slow and the peers need CUDA;
the uncompiled function the compile peer compiles is checked instead.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from unimrg_fast import backends

_spec = importlib.util.spec_from_file_location(
    "bench_losses", Path(__file__).resolve().parents[1] / "benchmarks" / "test_bench_losses.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up while being defined
_spec.loader.exec_module(bench)

CPU = torch.device("cpu")
F32 = torch.float32
RTOL = 1e-4
needs_triton = pytest.mark.skipif(not backends.triton().available,
                                  reason=f"Triton cannot run here: {backends.triton().detail}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = b.norm().item()
    return (a - b).norm().item() / (scale if scale > 0 else 1.0)


def run_once(step):
    loss, grads = step()
    assert loss.dim() == 0 and torch.isfinite(loss), f"loss {loss}"
    for k, g in enumerate(grads):
        assert g is not None, f"parameter {k} got no gradient"
        assert torch.isfinite(g).all(), f"gradient {k} is not finite"
        assert g.abs().sum() > 0, f"gradient {k} is all zeros"
    return loss, grads


def assert_same(fused, reference, what):
    (lf, gf), (lr, gr) = fused, reference
    assert rel_err(lf, lr) < RTOL, f"{what} loss: fused {lf.item()} vs reference {lr.item()}"
    for k, (a, b) in enumerate(zip(gf, gr)):
        err = rel_err(a, b)
        assert err < RTOL, f"{what} gradient {k}: rel err {err:.2e}"


def test_linear_ce_builder_shapes_and_flops():
    x = bench.make_linear_ce_inputs(40, 24, 50, F32, CPU, 0.1, seed=3)
    assert x.hidden.shape == (40, 24) and x.weight.shape == (50, 24)
    assert x.hidden.requires_grad and x.weight.requires_grad
    assert x.n_valid == 36 == int((x.target != bench.IGNORE_INDEX).sum())
    assert x.useful_flops == 6 * 36 * 24 * 50
    # the chunked fp32 check the benchmarks use agrees with the plain computation
    assert abs(bench.linear_ce_fp32(x, chunk=7) - bench.plain_linear_ce(
        x.hidden, x.weight, x.target).item()) < 1e-5


def test_linear_ce_steps_run_and_agree():
    x = bench.make_linear_ce_inputs(37, 24, 50, F32, CPU, 0.1, seed=1)
    eager = run_once(bench.linear_ce_step(x, "eager"))
    # what the torch.compile peer compiles, run eagerly
    plain = run_once(bench.make_step(
        lambda: bench.plain_linear_ce(x.hidden, x.weight, x.target), x.params))
    assert_same(plain, eager, "plain F.cross_entropy vs reference")
    assert abs(eager[0].item() - bench.linear_ce_fp32(x)) < 1e-5
    # each call starts from no gradient: a second call gives the same, not twice
    again = run_once(bench.linear_ce_step(x, "eager"))
    assert_same(again, eager, "second call")
    assert x.hidden.grad is None and x.weight.grad is None
    if backends.triton().available:
        fused = run_once(bench.linear_ce_step(x, "fused"))
        assert_same(fused, eager, "linear CE")


def test_linear_ce_variants_table():
    assert bench.LINEAR_CE_VARIANTS["eager"] == "baseline"
    assert bench.LINEAR_CE_VARIANTS["fused"] == "fused"
    assert set(bench.PEERS) <= set(bench.LINEAR_CE_VARIANTS)
    with pytest.raises(ValueError):
        bench.linear_ce_loss_fn("nonsense")


@needs_triton
def test_regression_steps_run_and_agree():
    x = bench.make_regression_inputs(37, 24, 5, F32, CPU, seed=2)
    assert x.useful_flops == 6 * 37 * 24 * 5
    reference = run_once(bench.regression_step(x, "reference"))
    fused = run_once(bench.regression_step(x, "triton"))
    assert_same(fused, reference, "regression")


def test_the_regression_baseline_multiplies_in_bf16_as_the_trainer_does():
    """Without autocast the reference upcast everything to fp32 (two fp32 [N, H] copies
    and fp32 matmuls), a baseline doing other work than the trainer's plain path."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                self.seen.add(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    x = bench.make_regression_inputs(37, 24, 5, torch.bfloat16, CPU, seed=2)
    for autocast, want in ((True, {torch.bfloat16}), (False, {torch.float32})):
        with MatmulDtypes() as mode:
            run_once(bench.regression_step(x, "reference", autocast=autocast))
        assert mode.seen == want, (autocast, mode.seen)


def tiny_pack(seed=4):
    return bench.make_unimrg_pack(64, 24, CPU, F32, vocab=50, codes=40, channels=5,
                                  text_rows=10, code_rows=16, depth_rows=12, pixel_rows=12,
                                  seed=seed)


def test_unimrg_pack_builder():
    pack = tiny_pack()
    rows = torch.cat([hd.rows for hd in pack.heads])
    assert rows.unique().numel() == rows.numel() == 50, "heads must score disjoint rows"
    assert [hd.task for hd in pack.heads] == [0, 1, 2, 3]
    assert pack.num_tasks == 4 and torch.equal(pack.task_weights, torch.ones(4))
    assert pack.useful_flops == 6 * 24 * (10 * 50 + 16 * 40 + 12 * 5 + 12 * 5)
    assert all(p.requires_grad for p in pack.params)
    with pytest.raises(ValueError):
        bench.make_unimrg_pack(40, 24, CPU, F32, vocab=50, codes=40, channels=5,
                               text_rows=10, code_rows=16, depth_rows=12, pixel_rows=12)


def test_joint_loss_steps_run_and_agree():
    pack = tiny_pack()
    reference = run_once(bench.joint_loss_step(pack, "reference"))
    assert abs(reference[0].item() - bench.joint_loss_fp32(pack)) < 1e-4
    if backends.triton().available:
        fused = run_once(bench.joint_loss_step(pack, "triton"))
        assert_same(fused, reference, "joint loss")


def test_first_call_checks_the_loss_and_skips_broken_peers():
    x = bench.make_linear_ce_inputs(37, 24, 50, F32, CPU, 0.1, seed=5)
    step = bench.linear_ce_step(x, "eager")
    expected = bench.linear_ce_fp32(x)
    bench._first_call(step, "eager", expected, peer=False)
    with pytest.raises(AssertionError, match="differs from the fp32 value"):
        bench._first_call(step, "eager", 2 * expected, peer=False)

    def broken():
        raise RuntimeError("incompatible triton")

    with pytest.raises(pytest.skip.Exception, match="incompatible triton"):
        bench._first_call(broken, "liger", expected, peer=True)
    with pytest.raises(RuntimeError):
        bench._first_call(broken, "fused", expected, peer=False)
