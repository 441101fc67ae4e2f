"""One trainer step, fused vs plain, on the same model and pack (DESIGN.md section 5).

    group                       variants (role)
    train-step-qwen2.5-1.5b     plain: impl="reference" (baseline) | fast: impl="triton" (fused)

A step is what `python -m trainer` does per micro-batch: the UMM's forward over one
16k-token task-interleaved pack (und + pixel + depth + seg samples of 128-px scenes, 1,024
tokens per image, mar family), ONE joint_loss call, backward, gradient clipping, AdamW.
Qwen2.5-1.5B's shape with random weights, bf16 autocast over fp32 master weights.
tokens/s counts the pack's real (non-padding) tokens, TFLOP/s its model FLOPs (the count
telemetry's MFU uses: trainer/telemetry.py FlopModel); peak extra memory is measured by
the harness. Both variants share the model, the optimizer and the pack, built once.

`make_train_step` is plain code so that tests/test_trainer_bench.py can build and run the
same callable on the CPU at the tiny preset before a GPU is lent.

Run: python -m pytest benchmarks/test_bench_train_step.py --benchmark-only [--results-save NAME]
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import pytest
import torch

PRESET = "qwen2.5-1.5b"
PACK_TOKENS = 16_384


def make_train_state(preset: str = PRESET, *, pack_tokens: int = PACK_TOKENS,
                     device: str = "cuda", precision: str = "bf16", family: str = "mar",
                     overrides: Optional[Dict] = None):
    """(model, optimizer, pack on device, config, autocast factory)."""
    from trainer.config import build_config
    from trainer.data import SampleFactory, TrainData
    from trainer.loop import autocast_for, build_optimizer
    from trainer.model import build_model

    config = build_config(preset, {"pack_tokens": pack_tokens, "family": family,
                                   "device": device, "precision": precision,
                                   "eval_questions": 0, "eval_scenes": 0, **(overrides or {})})
    dev = torch.device(device)
    model, text, images, cond_tokens = build_model(config)
    model.to(dev).train()
    data = TrainData(config, SampleFactory(config, text, images, cond_tokens), text.pad_id)
    pack = data.step()[0].to(dev)
    optimizer, _ = build_optimizer(model, config, dev)
    return model, optimizer, pack, config, autocast_for(config, dev)


def make_train_step(state, impl: str) -> Tuple[Callable[[], torch.Tensor], Dict]:
    """A callable running one full training step with `impl` ("triton" or "reference")
    for attention and losses; returns the step's loss (a device tensor, no sync)."""
    from trainer.estimate import train_step
    from trainer.telemetry import FlopModel

    model, optimizer, pack, config, autocast = state
    step = train_step(model, optimizer, [pack], impl, autocast, config.optim.grad_clip)

    info = {"tokens": pack.num_real_tokens, "pack_tokens": pack.num_tokens,
            "samples": len(pack.sample_tasks), "preset": config.preset,
            "family": config.model.family,
            "model_flops": FlopModel.from_model(model).pack(pack)}   # telemetry's MFU count
    return step, info


@pytest.fixture(scope="module")
def train_state():
    if not torch.cuda.is_available():
        pytest.skip("GPU benchmark: needs a CUDA device (none visible to torch)")
    return make_train_state()


@pytest.mark.benchmark(group=f"train-step-{PRESET}")
@pytest.mark.parametrize("impl, role", [("reference", "baseline"), ("triton", "fused")],
                         ids=["plain", "fast"])
def test_bench_train_step(gpu_bench, benchmark, train_state, impl, role):
    step, info = make_train_step(train_state, impl)
    loss = step()
    assert torch.isfinite(loss), f"{impl}: non-finite loss {loss}"
    median = gpu_bench(step, flops=info["model_flops"], role=role, rounds=10, warmup=2, **info)
    benchmark.extra_info["tokens_per_s"] = info["tokens"] / median
