"""The training loop: train(config) -> run directory.

One optimizer step = the step's packs (interleaved: --packs-per-step task-mixed packs;
round-robin: one single-task pack per task), each scored by ONE joint_loss call, their
gradients accumulated, clipped, AdamW, warm-up + cosine schedule. Per-task loss sums stay
on the device until a log step, the only place the host waits for the device: there the
losses are checked (a non-finite one stops the run naming its step and task), logged to
metrics.jsonl and shown on the progress bar.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from trainer import report
from trainer.config import TASKS, Config, ConfigError
from trainer.data import SampleFactory, TrainData
from trainer.evaluate import evaluate, held_out
from trainer.model import build_model
from unimrg_fast import backends

SHORT = {"und": "und", "pixel": "pix", "depth": "dep", "seg": "seg"}


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, task: str, value: float, run_dir: Path):
        super().__init__(f"non-finite loss {value} at step {step} in task {task}; the run "
                         f"stopped, earlier outputs are kept in {run_dir}")
        self.step, self.task, self.value, self.run_dir = step, task, value, run_dir


def resolve_device(config: Config) -> torch.device:
    if config.run.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.run.device)


def autocast_for(config: Config, device: torch.device):
    """bf16 autocast on GPU (or when asked), plain fp32 on CPU."""
    p = config.run.precision
    if p == "fp32" or (p == "auto" and device.type != "cuda"):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def kernel_impl(config: Config, device: torch.device) -> str:
    if not config.run.fast_kernels:
        return "reference"
    if device.type == "cpu" and not backends.triton_interpreted():
        raise ConfigError("--fast-kernels", "on a CPU the Triton kernels run on the interpreter, "
                                            "which needs TRITON_INTERPRET=1 set before unimrg_fast "
                                            "is imported (python -m trainer does this)")
    return "triton"


def build_optimizer(model: torch.nn.Module, config: Config, device: torch.device):
    o = config.optim
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
    plain = [p for p in params if p.dim() < 2 or id(p) in embeddings]
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": plain, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas,
                                  fused=device.type == "cuda" or None)
    warmup = math.ceil(o.warmup * o.steps)

    def factor(step: int) -> float:  # step 0 is the first optimizer step
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, o.steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LossTracker:
    """Per-step per-task loss sums on the device; read (one sync) at log steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.steps: List[int] = []
        self.sums: List[torch.Tensor] = []
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, step: int, loss_sum: torch.Tensor, weight_sum: torch.Tensor, tokens: int):
        self.steps.append(step)
        self.sums.append(torch.stack([loss_sum.detach(), weight_sum.detach()]))
        self.tokens += tokens

    def flush(self, run_dir: Path) -> Dict[str, float]:
        sums = torch.stack(self.sums).double().cpu()         # [steps, 2, tasks]: the sync
        elapsed = time.perf_counter() - self.start
        loss, weight = sums[:, 0], sums[:, 1]
        for i, step in enumerate(self.steps):                # name the first bad step / task
            for t, task in enumerate(TASKS):
                if weight[i, t] > 0 and not math.isfinite(loss[i, t]):
                    raise NonFiniteLoss(step, task, float(loss[i, t]), run_dir)
        row: Dict[str, float] = {"tokens": self.tokens, "interval_s": elapsed,
                                 "tokens_per_s": self.tokens / max(elapsed, 1e-9)}
        per_step_total = torch.zeros(len(self.steps), dtype=torch.float64)
        for t, task in enumerate(TASKS):
            w = weight[:, t].sum()
            row[f"loss/{task}"] = float(loss[:, t].sum() / w) if w > 0 else None
            has = weight[:, t] > 0
            per_step_total += torch.where(has, loss[:, t] / weight[:, t].clamp_min(1e-30), 0)
        row["loss"] = float(per_step_total.mean())
        self.steps, self.sums, self.tokens, self.start = [], [], 0, time.perf_counter()
        return row


def train(config: Config) -> Path:
    """Post-trains the configured UMM; returns the run directory (metrics, PNG, summary,
    checkpoint). Raises NonFiniteLoss (outputs so far kept) if a loss turns non-finite."""
    wall = time.perf_counter()
    device = resolve_device(config)
    if device.type == "cpu" and config.run.cpu_threads:
        torch.set_num_threads(config.run.cpu_threads)
    impl, autocast = kernel_impl(config, device), autocast_for(config, device)
    model, text, images, cond_tokens = build_model(config)
    if config.data.pack_tokens < config.longest_sample_tokens(cond_tokens):
        raise ConfigError("--pack-tokens", f"the ViT gives {cond_tokens} tokens per image, so "
                                           f"use --pack-tokens >= {config.longest_sample_tokens(cond_tokens)}")
    model.to(device).train()
    factory = SampleFactory(config, text, images, cond_tokens)
    data, held = TrainData(config, factory, text.pad_id), held_out(config, factory, text.pad_id)
    optimizer, schedule = build_optimizer(model, config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    run_dir = report.make_run_dir(config)
    report.write_config(run_dir, config)
    metrics = report.MetricsLog(run_dir / report.METRICS)
    before = evaluate(model, held, factory, text, device, impl, autocast)
    metrics.write({"event": "eval", "when": "before", "step": 0, **before})

    steps, log_every = config.optim.steps, config.run.log_every
    tracker, bar = LossTracker(device), _progress(config, steps)
    for step in range(1, steps + 1):
        packs = data.step()
        loss_sum = torch.zeros(len(TASKS), device=device)
        weight_sum = torch.zeros(len(TASKS), device=device)
        for pack in packs:
            with autocast():
                out = model.loss(pack.to(device), impl)
            (out.total / len(packs)).backward()
            loss_sum = loss_sum + out.task_loss_sum.detach()
            weight_sum = weight_sum + out.task_weight_sum.detach()
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
                     if config.optim.grad_clip > 0 else None)
        lr = schedule.get_last_lr()[0]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tracker.add(step, loss_sum, weight_sum, sum(p.num_real_tokens for p in packs))
        checkpoint = config.run.checkpoint_every and step % config.run.checkpoint_every == 0
        if step % log_every == 0 or step == steps or checkpoint:
            row = tracker.flush(run_dir)   # raises NonFiniteLoss before anything is written
            row.update(event="train", step=step, lr=lr,
                       grad_norm=float(grad_norm) if grad_norm is not None else None)
            metrics.write(row)
            bar.set_postfix_str(_postfix(row), refresh=False)
        if checkpoint:
            report.save_checkpoint(run_dir, model, config, step, images)
        bar.update()
    bar.close()

    after = evaluate(model, held, factory, text, device, impl, autocast)
    metrics.write({"event": "eval", "when": "after", "step": steps, **after})
    report.save_checkpoint(run_dir, model, config, steps, images)
    report.plot_losses(metrics.rows, run_dir / report.CURVES,
                       f"{config.preset} / {config.model.family} / {config.data.recipe} ({impl})")
    summary = report.summary(config, metrics.rows, before, after, time.perf_counter() - wall, impl)
    print(report.write_summary(run_dir, summary))
    return run_dir


def _progress(config: Config, steps: int):
    from tqdm import tqdm

    return tqdm(total=steps, desc=f"{config.model.family}/{config.data.recipe}", unit="step",
                disable=not config.run.progress, dynamic_ncols=True)


def _postfix(row: Dict[str, Optional[float]]) -> str:
    parts = [f"{SHORT[t]}={row[f'loss/{t}']:.3f}" for t in TASKS if row.get(f"loss/{t}") is not None]
    return " ".join(parts + [f"{row['tokens_per_s']:.0f} tok/s"])
