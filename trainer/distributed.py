"""Scale-out: `torchrun --nproc_per_node N -m trainer --parallel ddp|fsdp ...`.

One process per device, the process group from torchrun's environment (nccl on CUDA, gloo
on a CPU). The trainable model is wrapped in DDP (the frozen ViT has no gradient, so DDP
reduces nothing of it) or sharded with FSDP2 (`fully_shard` on every decoder layer, then
the root; the frozen ViT stays whole on every rank).

Data (synthetic scenes). A global step is what a 1-process run with N times the packs
draws: rank r of N takes the r-th block of each stream's packs (interleaved:
packs_per_step packs of the stream's packs_per_step * N; round-robin: one pack of each
task's N). Every rank replays
the same sample stream (a pure function of the seed) because first-fit-decreasing packing
decides over a buffer that spans the packs of all ranks: that is what makes the N-process
global batch identical to the 1-process one. The price: every rank makes (and packs) every
sample of the global step on the host, not only its own. Real data (--data) is read in
disjoint record shards per rank by trainer/realdata.py: there each rank packs its own.

Loss: per-task means over the GLOBAL step. With S_{p,t} the loss sum and c_{p,t} the
weight sum (row count) of task t in pack p, G_t = sum over all packs of all ranks of
c_{p,t} (host-known from the packs, one detached all-reduce of [num_tasks]), the objective is

    J = sum_t lambda_t * (sum_p S_{p,t}) / G_t.

Rank r backpropagates l_r = N * sum_{p on r} sum_t lambda_t S_{p,t} / G_t (one pack at a
time, gradients accumulated); DDP and FSDP average gradients over the N ranks, so the
applied gradient is (1/N) sum_r grad l_r = grad J. A task with G_t = 0 contributes 0 and no
NaN (unimrg_fast.specs.total_from_sums). The same normalisation with N = 1 is what a
1-process `--parallel ddp` run does; note that the plain loop (no --parallel) instead
averages each pack's own per-task means over the packs, so with several packs per step
its gradient differs (its logged loss, J, does not).

Every rank gives every trainable parameter a gradient (0 * one element of each head's
weights joins the loss: FSDP2 reduce-scatters only the gradients a rank has, so a rank
whose packs lack answers would mismatch the collective); a head that no pack of the global
step used then gets its gradient dropped (None, as in the plain loop, so AdamW's momentum
and weight decay leave it alone). With one pack per step a `--parallel ddp` run is
bit-identical to the plain loop (tests/test_distributed.py).

Rank 0 alone writes the run directory (metrics, evaluation, checkpoint, summary); the
others compute and wait. Not supported here yet: --resume and --checkpoint-every (the
resumable checkpoints), telemetry / TensorBoard.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trainer import report
from trainer.config import TASKS, Config, ConfigError
from trainer.data import UND, Pack, SampleFactory, TrainData
from trainer.evaluate import evaluate, held_out
from trainer.loop import (LossTracker, build_optimizer, build_run, resolve_device, _postfix,
                          _progress)
from trainer.model import build_model
from unimrg_fast.packing import StreamingPacker
from unimrg_fast.specs import total_from_sums


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def mode(config: Config) -> Optional[str]:
    """ddp / fsdp, or None for the plain 1-process loop (trainer.loop)."""
    chosen = config.run.parallel
    if chosen is None and env_world_size() > 1:
        chosen = "ddp"
    return chosen


def requested(config: Config) -> bool:
    return mode(config) is not None


@dataclasses.dataclass
class Context:
    rank: int
    world: int
    device: torch.device
    mode: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (detached, in place)."""
        if self.world > 1:
            dist.all_reduce(x)
        return x


def init(config: Config) -> Context:
    """The process group from torchrun's env (RANK, WORLD_SIZE, MASTER_ADDR / PORT)."""
    world = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(config)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # gloo for host tensors (the step's row counts) also next to nccl: no device sync
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return Context(rank, world, device, mode(config))


def shutdown(ctx: Context) -> None:
    if ctx.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- data
class ShardedData:
    """This rank's block of each global step (see the module docstring)."""

    def __init__(self, config: Config, factory: SampleFactory, pad_id: int, ctx: Context):
        d = config.data
        self.inner = TrainData(config, factory, pad_id)
        # Real data (--data) is already sharded by rank in trainer/realdata.py: each rank
        # packs its own records. Synthetic: N times the packs, from the same stream.
        self.world = 1 if d.data is not None else ctx.world
        self.rank = 0 if d.data is not None else ctx.rank
        for stream in self.inner.streams:
            stream.packs *= self.world
            stream.packer = StreamingPacker(d.pack_tokens, max_packs=stream.packs)
        self.per_rank = [s.packs // self.world for s in self.inner.streams]

    @property
    def skipped(self):
        return self.inner.skipped

    def step(self) -> List[Pack]:
        packs = []
        for stream, k in zip(self.inner.streams, self.per_rank):
            packs += stream.next_packs()[self.rank * k:(self.rank + 1) * k]
        return packs


def weight_sums(packs: List[Pack]) -> torch.Tensor:
    """[num_tasks] rows each task scores in these packs (the joint loss's weight sums: the
    model's heads use no per-row weights), from host arrays: no device sync."""
    counts = np.zeros(len(TASKS), dtype=np.float64)
    for pack in packs:
        counts[UND] += pack.text_rows.shape[0]
        counts += np.bincount(pack.scored_task.numpy(), minlength=len(TASKS))[:len(TASKS)]
    return torch.from_numpy(counts).float()


# -------------------------------------------------------------------------- model
class _LossModule(nn.Module):
    """forward(pack, impl) = UMM.loss, the call DDP's and FSDP's hooks run on. It adds 0 *
    one element of every trainable parameter outside the decoder layers (which every pack
    uses): a pack without answers would leave the LM head without a gradient, one without
    images the generation side, and FSDP2 reduce-scatters only the gradients a rank has (a
    collective mismatch), DDP would need find_unused_parameters' graph walk."""

    def __init__(self, umm: nn.Module):
        super().__init__()
        self.umm = umm
        layers = {id(p) for p in umm.llm.layers.parameters()}
        self._touch = [name for name, p in umm.named_parameters()
                       if p.requires_grad and id(p) not in layers]

    def forward(self, pack: Pack, impl: str):
        out = self.umm.loss(pack, impl)
        params = dict(self.umm.named_parameters())
        zero = sum(params[name].reshape(-1)[0].float() for name in self._touch) * 0.0
        return out._replace(task_loss_sum=out.task_loss_sum + zero)


def wrap(umm: nn.Module, ctx: Context):
    """(the module a step runs packs through, sync(last) -> context for one pack's forward
    and backward: gradients are reduced over ranks after the step's last pack only)."""
    import contextlib

    if ctx.world == 1:
        return _LossModule(umm), (lambda last: contextlib.nullcontext())
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # device_ids=None: the packs are already on the device (DDP would rebuild them)
        ddp = DDP(_LossModule(umm), device_ids=None)
        return ddp, (lambda last: contextlib.nullcontext() if last else ddp.no_sync())
    from torch.distributed.fsdp import fully_shard

    for layer in umm.llm.layers:
        fully_shard(layer)
    root = _LossModule(umm)
    fully_shard(root, ignored_params=set(umm.vit.parameters()))

    def sync(last: bool):
        root.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    return root, sync


def full_trainable_state(umm: nn.Module, model: nn.Module, ctx: Context):
    """The trainable weights as full CPU tensors on rank 0 (a collective under FSDP)."""
    if ctx.mode == "fsdp" and ctx.world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
    else:
        state = umm.state_dict()
    state = {k.removeprefix("umm."): v for k, v in state.items()}
    return {k: v.detach().cpu() for k, v in state.items() if not k.startswith("vit.")}


class _Weights:
    """What report.save_checkpoint needs of a model."""

    def __init__(self, state):
        self.state = state

    def trainable_state_dict(self):
        return self.state


def drop_unused_grads(umm: nn.Module, counts: torch.Tensor) -> None:
    """No gradient (not a zero one) for a head no pack of the global step used, as in the
    plain loop: AdamW then leaves it alone (a zero gradient would still move it through
    its momentum and weight decay). The LM head scores und rows only; the generation side
    is used exactly when a target image is in the step."""
    unused = []
    if counts[UND] == 0:
        unused += list(umm.lm_head.parameters())
    if counts.sum() == counts[UND]:
        unused += list(umm.gen.parameters())
    for p in unused:
        p.grad = None


# --------------------------------------------------------------------------- train
def train(config: Config) -> Optional[Path]:
    """The data- or fully-sharded-parallel run; returns the run directory on rank 0, None
    on the other ranks."""
    if config.run.resume is not None:
        raise ConfigError("--resume", "not supported with --parallel / torchrun yet")
    if config.run.checkpoint_every:
        raise ConfigError("--checkpoint-every", "not supported with --parallel / torchrun yet "
                                                "(the final checkpoint.pt is written)")
    ctx = init(config)
    try:
        return _train(config, ctx)
    finally:
        shutdown(ctx)


def _train(config: Config, ctx: Context) -> Optional[Path]:
    wall = time.perf_counter()
    device = ctx.device
    umm, text, images, factory, impl, autocast = build_run(config, device)
    data, held = ShardedData(config, factory, text.pad_id, ctx), held_out(config, factory, text.pad_id)
    run_dir = metrics = before = None
    if ctx.main:   # the weights are still the same everywhere: rank 0 evaluates alone
        run_dir = report.make_run_dir(config)
        metrics = report.MetricsLog(run_dir / report.METRICS)
        report.write_config(run_dir, config)
        before = evaluate(umm, held, factory, text, device, impl, autocast)
        metrics.write({"event": "eval", "when": "before", "step": 0, **before})
    ctx.barrier()
    model, sync = wrap(umm, ctx)
    optimizer, schedule = build_optimizer(umm, config, device)
    params = [p for p in umm.parameters() if p.requires_grad]
    lambdas = umm.task_weights

    steps, log_every = config.optim.steps, config.run.log_every
    tracker = LossTracker(device)
    bar = _progress(dataclasses.replace(config, run=dataclasses.replace(
        config.run, progress=config.run.progress and ctx.main)), steps)
    for step in range(1, steps + 1):
        packs = data.step()
        counts = ctx.all_reduce(weight_sums(packs))   # host tensor: no device sync
        global_weight = counts.to(device)
        loss_sum = torch.zeros(len(TASKS), device=device)
        for i, pack in enumerate(packs):
            with sync(i == len(packs) - 1):
                with autocast():
                    out = model(pack.to(device), impl)
                (total_from_sums(out.task_loss_sum, global_weight, lambdas) * ctx.world).backward()
            loss_sum = loss_sum + out.task_loss_sum.detach().float()
        drop_unused_grads(umm, counts)
        tokens = torch.tensor([float(sum(p.num_real_tokens for p in packs))], device=device)
        reduced = ctx.all_reduce(torch.cat([loss_sum, tokens]))
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
                     if config.optim.grad_clip > 0 else None)
        lr = schedule.get_last_lr()[0]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ctx.main:
            tracker.add(step, reduced[:-1], global_weight, int(reduced[-1].item()))
            if step % log_every == 0 or step == steps:
                row = tracker.flush(run_dir)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                row.update(event="train", step=step, lr=lr, world_size=ctx.world,
                           grad_norm=float(grad_norm) if grad_norm is not None else None)
                metrics.write(row)
                bar.set_postfix_str(_postfix(row), refresh=False)
        bar.update()
    bar.close()

    state = full_trainable_state(umm, model, ctx)   # every rank joins the gather
    if ctx.main:
        if ctx.mode == "fsdp" and ctx.world > 1:   # evaluate a whole copy on rank 0
            umm, *_ = build_model(config)
            umm.load_state_dict(state, strict=False)
            umm.to(device).train()
        after = evaluate(umm, held, factory, text, device, impl, autocast)
        metrics.write({"event": "eval", "when": "after", "step": steps, **after})
        report.save_checkpoint(run_dir, _Weights(state), config, steps, images)
        report.plot_losses(metrics.rows, run_dir / report.CURVES,
                           f"{config.preset} / {config.model.family} / {config.data.recipe} "
                           f"({impl}, {ctx.mode} x{ctx.world})")
        summary = report.summary(config, metrics.rows, before, after,
                                 time.perf_counter() - wall, impl)
        print(report.write_summary(run_dir, summary), flush=True)
    ctx.barrier()
    return run_dir
