"""The train-step benchmark's own code (benchmarks/test_bench_train_step.py), built at the
tiny preset and run once on the CPU, so it is known to work before a GPU is lent: the
fused (Triton interpreter) and plain steps give the same finite loss on the same pack."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from trainer_helpers import SMALL
from unimrg_fast import backends

_spec = importlib.util.spec_from_file_location(
    "bench_train_step", Path(__file__).resolve().parents[1] / "benchmarks" / "test_bench_train_step.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)


@pytest.mark.skipif(not backends.triton().available,
                    reason=f"Triton cannot run here: {backends.triton().detail}")
def test_train_step_builder_runs_fast_and_plain_at_the_tiny_preset():
    shape = {k: v for k, v in SMALL.items() if k not in ("pack_tokens",)}
    state = bench.make_train_state("tiny", pack_tokens=256, device="cpu", precision="fp32",
                                   overrides=shape)
    model = state[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    plain, info = bench.make_train_step(state, "reference")
    fast, _ = bench.make_train_step(state, "triton")
    assert info["tokens"] > 0 and info["pack_tokens"] == 256 and info["preset"] == "tiny"
    assert info["model_flops"] > 6 * info["tokens"]   # TFLOP/s of the step: a real count
    # Snapshot the weights so that both variants score the same model.
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    loss_plain = plain()
    model.load_state_dict(weights)
    state[1].state.clear()
    loss_fast = fast()
    assert torch.isfinite(loss_plain) and torch.isfinite(loss_fast)
    assert loss_fast.item() == pytest.approx(loss_plain.item(), rel=1e-5)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, "the step did not update any weight"
