"""Scale-out: `torchrun --nproc_per_node N -m trainer --parallel ddp|fsdp ...`, and the
pieces the one training loop (trainer/loop.py) uses for every run, one process or many.

One process per device, the process group from torchrun's environment (nccl on CUDA, gloo
on a CPU, plus gloo for the host tensors next to nccl). The trainable model is wrapped in
DDP (the frozen ViT has no gradient, so DDP reduces nothing of it) or sharded with FSDP2
(`fully_shard` on every decoder layer, then the root; the frozen ViT stays whole on every
rank). A plain run (no --parallel, no torchrun) is the same loop with a Context of one
process and no process group.

Data (synthetic scenes). A global step is what a 1-process run with N times the packs
draws: rank r of N takes the r-th block of each stream's packs (interleaved:
packs_per_step packs of the stream's packs_per_step * N; round-robin: one pack of each
task's N). Every rank replays the same sample stream (a pure function of the seed)
because first-fit-decreasing packing decides over a buffer that spans the packs of all
ranks: that is what makes the N-process global batch identical to the 1-process one. The
price: every rank makes (and packs) every sample of the global step on the host, not only
its own. Real data (--data) is read in disjoint record shards per rank by
trainer/realdata.py: there each rank packs its own.

Loss: per-task means over the GLOBAL step, for every run. With S_{p,t} the loss sum and
c_{p,t} the weight sum (row count) of task t in pack p, G_t = sum over all packs of all
ranks of c_{p,t} (host-known from the packs, one detached host all-reduce per step), the
objective is

    J = sum_t lambda_t * (sum_p S_{p,t}) / G_t,

DESIGN.md 3.3's joint loss over all rows of the step. Rank r backpropagates
l_r = N * sum_{p on r} sum_t lambda_t S_{p,t} / G_t (one pack at a time, gradients
accumulated); DDP and FSDP average gradients over the N ranks, so the applied gradient is
(1/N) sum_r grad l_r = grad J. A task with G_t = 0 contributes 0 and no NaN
(unimrg_fast.specs.total_from_sums).

With N > 1 every rank gives every trainable parameter a gradient (0 * one element of each
head's weights joins the loss: FSDP2 reduce-scatters only the gradients a rank has, so a
rank whose packs lack answers would mismatch the collective); a head that no pack of the
global step used then gets its gradient dropped (None, as in a 1-process run, so AdamW's
momentum and weight decay leave it alone).

Rank 0 alone writes the run directory (metrics, evaluation, telemetry, TensorBoard,
summary); checkpoints are written by every rank together (trainer/checkpoint.py).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import gc
import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trainer.config import TASKS, Config
from trainer.data import UND, Pack, SampleFactory, TrainData


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def mode(config: Config) -> Optional[str]:
    """ddp / fsdp, or None for a plain 1-process run."""
    chosen = config.run.parallel
    if chosen is None and env_world_size() > 1:
        chosen = "ddp"
    return chosen


@dataclasses.dataclass
class Context:
    """This process's place in the run: rank, world size, device, ddp / fsdp / None."""

    rank: int
    world: int
    device: torch.device
    mode: Optional[str]

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """The weights live in shards (FSDP over several ranks): reading them whole is a
        collective, and rank 0 alone cannot run the model."""
        return self.mode == "fsdp" and self.world > 1

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (detached, in place)."""
        if self.world > 1:
            dist.all_reduce(x)
        return x

    def broadcast(self, value: Any) -> Any:
        """Rank 0's value (any picklable object) on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_counters(self, counts: Dict[str, int]) -> Dict[str, int]:
        """Per-key sums of every rank's counters (e.g. skipped records by reason)."""
        if self.world == 1:
            return dict(counts)
        gathered: List[Optional[Dict[str, int]]] = [None] * self.world
        dist.all_gather_object(gathered, dict(counts))
        total: Dict[str, int] = collections.Counter()
        for part in gathered:
            total.update(part or {})
        return dict(total)

    def any_failed(self, failed: bool) -> List[int]:
        """The ranks for which `failed` is true (a collective: every rank must call it)."""
        flags = torch.zeros(self.world, dtype=torch.int32)
        flags[self.rank] = int(failed)
        self.all_reduce(flags)
        return [r for r in range(self.world) if flags[r]]


SINGLE = Context(0, 1, torch.device("cpu"), None)


def init(config: Config, device: torch.device) -> Context:
    """The process group from torchrun's env (RANK, WORLD_SIZE, MASTER_ADDR / PORT), or a
    1-process Context without one."""
    world = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    if world == 1 and config.run.parallel is not None:
        print(f"--parallel {config.run.parallel}: one process (WORLD_SIZE is not above 1), so "
              f"a plain run; start it with torchrun --nproc_per_node N -m trainer ... to scale "
              f"out", flush=True)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # gloo for host tensors (the step's row counts) also next to nccl: no device sync
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return Context(rank, world, device, mode(config))


def shutdown(ctx: Context) -> None:
    if ctx.world > 1 and dist.is_initialized():
        # The run's modules are gone by now, but FSDP / DDP state sits in reference cycles
        # that may still hold gloo work objects and their tensors; collect them while the
        # group is alive, not during interpreter teardown (one rank once aborted at exit
        # with "terminate called without an active exception" after a complete run).
        gc.collect()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- data
class ShardedData:
    """This rank's block of each global step (see the module docstring)."""

    def __init__(self, config: Config, factory: SampleFactory, pad_id: int, ctx: Context):
        # Real data (--data) is already sharded by rank in trainer/realdata.py: each rank
        # packs its own records. Synthetic: N times the packs, from the same stream.
        real = config.data.data is not None
        self.world = 1 if real else ctx.world
        self.rank = 0 if real else ctx.rank
        self.inner = TrainData(config, factory, pad_id, replicas=self.world)

    @property
    def skipped(self) -> Dict[str, int]:
        return self.inner.skipped

    def close(self) -> None:
        self.inner.close()

    def step(self) -> List[Pack]:
        packs = []
        for group in self.inner.step_by_stream():
            k = len(group) // self.world
            packs += group[self.rank * k:(self.rank + 1) * k]
        return packs

    def state_dict(self) -> Dict[str, object]:
        """This rank's data position (TrainData.state_dict)."""
        return self.inner.state_dict()

    def load_state_dict(self, state: Optional[Dict[str, object]]) -> bool:
        return self.inner.load_state_dict(state)


# Layout of step_counts(): the per-task weight sums, then what telemetry needs.
TOKENS, FLOPS = len(TASKS), len(TASKS) + 1


def weight_sums(packs: List[Pack]) -> torch.Tensor:
    """[num_tasks] rows each task scores in these packs (the joint loss's weight sums: the
    model's heads use no per-row weights), from host arrays: no device sync."""
    counts = np.zeros(len(TASKS), dtype=np.float64)
    for pack in packs:
        counts[UND] += pack.text_rows.shape[0]
        counts += np.bincount(pack.scored_task.numpy(), minlength=len(TASKS))[:len(TASKS)]
    return torch.from_numpy(counts).float()


def step_counts(packs: List[Pack], flops: float = 0.0) -> torch.Tensor:
    """float64 host tensor [num_tasks + 2]: weight_sums, real tokens and this rank's model
    FLOPs of the step (telemetry's MFU). One all-reduce of it gives every rank the global
    step's counts."""
    tokens = sum(p.num_real_tokens for p in packs)
    return torch.cat([weight_sums(packs).double(),
                      torch.tensor([tokens, flops], dtype=torch.float64)])


# -------------------------------------------------------------------------- model
class _LossModule(nn.Module):
    """forward(pack, impl) = UMM.loss, the call DDP's and FSDP's hooks run on. With `touch`
    it adds 0 * one element of every trainable parameter outside the decoder layers (which
    every pack uses): a pack without answers would leave the LM head without a gradient,
    one without images the generation side, and FSDP2 reduce-scatters only the gradients a
    rank has (a collective mismatch), DDP would need find_unused_parameters' graph walk."""

    def __init__(self, umm: nn.Module, touch: bool):
        super().__init__()
        self.umm = umm
        # named_parameters() yields a tied LM head's weight once (as the input embeddings)
        layers = {id(p) for p in umm.llm.layers.parameters()}
        self._touch = [name for name, p in umm.named_parameters()
                       if touch and p.requires_grad and id(p) not in layers]

    def forward(self, pack: Pack, impl: str):
        out = self.umm.loss(pack, impl)
        if not self._touch:
            return out
        params = dict(self.umm.named_parameters())
        zero = sum(params[name].reshape(-1)[0].float() for name in self._touch) * 0.0
        return out._replace(task_loss_sum=out.task_loss_sum + zero)


def wrap(umm: nn.Module, ctx: Context):
    """(the module a step runs packs through, sync(last) -> context for one pack's forward
    and backward: gradients are reduced over ranks after the step's last pack only)."""
    if ctx.world == 1:
        return _LossModule(umm, touch=False), (lambda last: contextlib.nullcontext())
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # device_ids=None: the packs are already on the device (DDP would rebuild them)
        ddp = DDP(_LossModule(umm, touch=True), device_ids=None)
        return ddp, (lambda last: contextlib.nullcontext() if last else ddp.no_sync())
    from torch.distributed.fsdp import fully_shard

    for layer in umm.llm.layers:
        fully_shard(layer)
    root = _LossModule(umm, touch=True)
    fully_shard(root, ignored_params=set(umm.vit.parameters()))

    def sync(last: bool):
        root.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    return root, sync


def full_trainable_state(umm: nn.Module, ctx: Context) -> Dict[str, torch.Tensor]:
    """The trainable weights as full CPU tensors (a collective under FSDP: every rank must
    call it; rank 0 gets them)."""
    if ctx.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(umm, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    else:
        state = umm.state_dict()
    return {k: v.detach().cpu() for k, v in state.items() if not k.startswith("vit.")}


def drop_unused_grads(umm: nn.Module, counts: torch.Tensor) -> None:
    """No gradient (not a zero one) for a head no pack of the global step used: AdamW then
    leaves it alone (a zero gradient would still move it through its momentum and weight
    decay). The LM head scores und rows only; the generation side is used exactly when a
    target image is in the step. A parameter an unused head shares with a used module
    keeps its gradient: a tied LM head's weight is the input embeddings every pack reads."""
    unused = []
    if counts[UND] == 0:
        unused.append(umm.lm_head)
    if counts.sum() == counts[UND]:
        unused.append(umm.gen)
    if not unused:
        return
    used = {id(p) for child in umm.children() if child not in unused
            for p in child.parameters()}
    for module in unused:
        for p in module.parameters():
            if id(p) not in used:
                p.grad = None
