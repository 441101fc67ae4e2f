"""The training loop: train(config) -> run directory.

One optimizer step = the step's packs (interleaved: --packs-per-step task-mixed packs;
round-robin: one single-task pack per task), each scored by ONE joint_loss call, their
gradients accumulated, clipped, AdamW, warm-up + cosine schedule. The step's objective is
the joint loss over all of its rows: per-task means by the step's row counts (over every
rank under torchrun: trainer/distributed.py), so how the rows fall into packs does not
change the gradient. The same loop runs one process and DDP / FSDP2.

A long run never dies on one bad sample: a step whose loss sum (any task) or global
gradient norm is not finite is SKIPPED, with no weight update and the AdamW state
unchanged. The decision stays on the device: fused AdamW (CUDA and CPU) reads it from
`optimizer.found_inf` (its kernel returns early and the step counter is rolled back, as
under a GradScaler); an unfused AdamW (another device) has the host check it.
Per-task loss sums, gradient norms and skip flags stay on the device until a log step, the
only place the host waits for the device: there skipped steps are counted (skipped_steps,
skipped_steps_total in metrics.jsonl) and left out of the loss averages, the run stops
(NonFiniteLoss, naming the step and the task) once more than --max-skipped-steps
consecutive steps were skipped (its sound weights written to checkpoint.pt first), and
the rest is logged to metrics.jsonl and shown on the
progress bar. Checkpoints are written at log steps, after that check, from weights no
skipped step touched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from trainer import checkpoint as ckpt
from trainer import distributed, report
from trainer.config import TASKS, Config, ConfigError
from trainer.data import SampleFactory, to_device
from trainer.evaluate import evaluate, held_out
from trainer.model import build_model
from trainer.telemetry import Telemetry
from unimrg_fast import backends
from unimrg_fast.specs import total_from_sums

SHORT = {"und": "und", "pixel": "pix", "depth": "dep", "seg": "seg"}


class NonFiniteLoss(RuntimeError):
    """More than --max-skipped-steps consecutive steps had a non-finite loss or gradient
    norm (each was skipped, the weights untouched). `step` is the step that went over the
    limit; `task` the first task whose loss was not finite there (None: only the gradient
    norm was), `value` that loss or norm."""

    def __init__(self, step: int, task: Optional[str], value: float, run_dir: Path,
                 consecutive: int = 1, limit: int = 0):
        what = f"loss {value} in task {task}" if task is not None else f"gradient norm {value}"
        steps = f"step {step}" if consecutive == 1 else f"steps {step - consecutive + 1}-{step}"
        super().__init__(f"non-finite {what} at step {step}: {consecutive} consecutive "
                         f"skipped step(s) ({steps}), more than --max-skipped-steps {limit}; "
                         f"the run stopped, earlier outputs are kept in {run_dir}, and its "
                         f"weights as they are (no skipped step touched them) in "
                         f"{run_dir / report.CHECKPOINT}")
        self.step, self.task, self.value, self.run_dir = step, task, value, run_dir
        self.consecutive, self.limit = consecutive, limit


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
    triton = backends.triton()
    if not triton.available:   # no triton, or an interpreter that cannot run under this numpy
        raise ConfigError("--fast-kernels", f"the Triton kernels cannot run here: {triton.detail}; "
                                            f"drop --fast-kernels to train on the plain path")
    return "triton"


def build_optimizer(model: torch.nn.Module, config: Config, device: torch.device):
    o = config.optim
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
    plain = [p for p in params if p.dim() < 2 or id(p) in embeddings]
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": plain, "weight_decay": 0.0}]
    # Fused on the CPU too (torch >= 2.4): a skipped step then goes through the same
    # found_inf path as on CUDA, which makes the AdamW state even when the step is
    # skipped. Unfused, a run whose steps so far were all skipped has no state, and a
    # checkpoint's get_state_dict makes it by stepping on zero gradients (DCP's
    # _init_optim_state): AdamW's step count 1 ahead, the rest of the run changed.
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas,
                                  fused=device.type in ("cuda", "cpu") or None)
    # rounded first: 0.07 * 100 is 7.000000000000001, which ceil made 8 warm-up steps
    warmup = math.ceil(round(o.warmup * o.steps, 6))

    def factor(step: int) -> float:  # step 0 is the first optimizer step
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, o.steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LossTracker:
    """Per step, on the device: the per-task loss and weight sums, the global gradient norm
    and whether the step was applied (finite) or skipped; read (one sync) at log steps.
    Counts the skipped steps: in all (skipped_total) and the current run of consecutive
    ones (consecutive); a checkpoint stores both (state())."""

    def __init__(self, device: torch.device, max_skipped: int = 0, skipped_total: int = 0,
                 consecutive: int = 0):
        self.device, self.max_skipped = device, max_skipped
        self.skipped_total, self.consecutive = skipped_total, consecutive
        self.steps: List[int] = []
        self.values: List[torch.Tensor] = []
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, step: int, loss_sum: torch.Tensor, weight_sum: torch.Tensor, tokens: int,
            grad_norm: torch.Tensor, finite: torch.Tensor):
        self.steps.append(step)
        self.values.append(torch.cat([loss_sum.detach().float(), weight_sum.detach().float(),
                                      grad_norm.detach().float().reshape(1),
                                      finite.detach().float().reshape(1)]))
        self.tokens += tokens

    def state(self) -> Dict[str, int]:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive}

    def flush(self, run_dir: Path) -> Dict[str, float]:
        """The log row of the steps since the last flush; raises NonFiniteLoss (before
        anything is written) once more than max_skipped consecutive steps were skipped."""
        n = len(TASKS)
        values = torch.stack(self.values).double().cpu()   # [steps, 2 * tasks + 2]: the sync
        elapsed = time.perf_counter() - self.start
        loss, weight, norm = values[:, :n], values[:, n:2 * n], values[:, 2 * n]
        applied = values[:, 2 * n + 1] > 0
        skipped = 0
        for i, step in enumerate(self.steps):
            if applied[i]:
                self.consecutive = 0
                continue
            skipped += 1
            self.consecutive += 1
            if self.consecutive > self.max_skipped:   # name the step and its first bad task
                bad = [t for t in range(n) if not math.isfinite(loss[i, t])]
                task, value = ((TASKS[bad[0]], float(loss[i, bad[0]])) if bad
                               else (None, float(norm[i])))
                raise NonFiniteLoss(step, task, value, run_dir, self.consecutive,
                                    self.max_skipped)
        self.skipped_total += skipped
        row: Dict[str, float] = {"tokens": self.tokens, "interval_s": elapsed,
                                 "tokens_per_s": self.tokens / max(elapsed, 1e-9)}
        loss, weight = loss[applied], weight[applied]          # skipped steps: left out
        per_step_total = torch.zeros(loss.shape[0], dtype=torch.float64)
        for t, task in enumerate(TASKS):
            w = weight[:, t].sum()
            row[f"loss/{task}"] = float(loss[:, t].sum() / w) if w > 0 else None
            has = weight[:, t] > 0
            per_step_total += torch.where(has, loss[:, t] / weight[:, t].clamp_min(1e-30), 0)
        row["loss"] = float(per_step_total.mean()) if loss.shape[0] else None
        last_norm = float(norm[-1])                            # the log step's own
        row["grad_norm"] = last_norm if math.isfinite(last_norm) else None
        row["skipped_steps"], row["skipped_steps_total"] = skipped, self.skipped_total
        self.steps, self.values, self.tokens, self.start = [], [], 0, time.perf_counter()
        return row


def optimizer_step(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """AdamW's step, or none when `finite` (a bool tensor) is false: the weights and the
    AdamW state stay as they are. Fused AdamW (CUDA, CPU) decides on the device, no host
    sync: its kernel returns early when optimizer.found_inf is 1 and the step counters are
    rolled back (torch/optim/adam.py, _fused_adam: the GradScaler protocol). Otherwise
    (an unfused AdamW) the host checks."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~finite).to(torch.float32)
        optimizer.grad_scale = None
        optimizer.step()
    elif bool(finite):
        optimizer.step()


def step_objective(out, step_counts: torch.Tensor, lambdas, world: int) -> torch.Tensor:
    """This pack's share of the step's objective J = sum_t lambda_t S_t / G_t (S_t: task
    t's loss sum, G_t: its rows in the whole step, over every rank), times the world size:
    DDP / FSDP average the ranks' gradients (trainer/distributed.py)."""
    return total_from_sums(out.task_loss_sum, step_counts, lambdas) * world


def build_run(config: Config, device: torch.device):
    """What every training entry point (this loop, trainer.distributed) builds first:
    (model on `device` in train mode, text tokenizer, image tokenizer, sample factory,
    kernel impl, autocast factory)."""
    if device.type == "cpu" and config.run.cpu_threads:
        cores = os.cpu_count() or 1
        if config.run.cpu_threads > cores:   # torch allocates per thread: 1e5 -> MemoryError
            raise ConfigError("--cpu-threads", f"must be <= this machine's {cores} CPU(s), got "
                                               f"{config.run.cpu_threads}")
        torch.set_num_threads(config.run.cpu_threads)
    impl, autocast = kernel_impl(config, device), autocast_for(config, device)
    model, text, images, cond_tokens = build_model(config)
    if config.data.pack_tokens < config.longest_sample_tokens(cond_tokens):
        raise ConfigError("--pack-tokens", f"the ViT gives {cond_tokens} tokens per image, so "
                                           f"use --pack-tokens >= {config.longest_sample_tokens(cond_tokens)}")
    model.to(device).train()
    return model, text, images, SampleFactory(config, text, images, cond_tokens), impl, autocast


def train(config: Config) -> Optional[Path]:
    """Post-trains the configured UMM; returns the run directory (metrics, PNG, summary,
    checkpoints) on rank 0, None on the other ranks of a torchrun run. Raises
    NonFiniteLoss (outputs so far kept) once more than --max-skipped-steps consecutive
    steps had a non-finite loss or gradient norm (each is skipped), CheckpointError (the
    previous checkpoint intact) if a checkpoint or another output cannot be written.

    One loop for every run: a plain one (one process), and DDP / FSDP2 under torchrun
    (trainer/distributed.py: its docstring gives the loss normalisation, by the global
    step's counts, and the data split).

    With --resume the run continues in the checkpoint's run directory: model, AdamW,
    schedule, RNG states and the data position are restored, metrics rows past the
    checkpoint's step are dropped, later checkpoints (an abandoned timeline) are moved to
    checkpoints/abandoned/, and the steps that follow log the identical losses."""
    resume_from, saved = None, None
    if config.run.resume:   # checked before any work: a bad checkpoint exits at once
        resume_from = ckpt.resolve(config.run.resume, config.run.resume_dir)
        ckpt.run_dir_of(resume_from)   # a checkpoint outside its run's checkpoints/: refused
        saved = ckpt.read_state(resume_from)
        ckpt.check_compatible(saved["config"], config, saved["step"], resume_from)
        ckpt.check_world(saved, distributed.env_world_size(), resume_from)
    ctx = distributed.init(config, resolve_device(config))
    with contextlib.ExitStack() as cleanup:   # last in, first out: data workers, then group
        cleanup.callback(distributed.shutdown, ctx)
        return _train(config, ctx, resume_from, cleanup)


def _train(config: Config, ctx: distributed.Context, resume_from: Optional[Path],
           cleanup: contextlib.ExitStack) -> Optional[Path]:
    wall = time.perf_counter()
    device = ctx.device
    umm, text, images, factory, impl, autocast = build_run(config, device)
    data = distributed.ShardedData(config, factory, text.pad_id, ctx)
    cleanup.callback(data.close)   # the real data's workers stop when train() ends, however
    held = held_out(config, factory, text.pad_id)
    if resume_from is not None:
        run_dir = ckpt.run_dir_of(resume_from)
        if ctx.main and (Path(config.run.out).resolve(), config.run.name) \
                not in ((run_dir.parent, None), (run_dir.parent, run_dir.name)):
            print(f"--out / --name are not used when resuming: the run continues in its own "
                  f"directory {run_dir}", flush=True)
        # the stored configs (config.yaml, checkpoints) name the directory the run is in
        config = dataclasses.replace(config, run=dataclasses.replace(
            config.run, out=str(run_dir.parent), name=run_dir.name))
    else:   # rank 0 names it (a fresh directory); every rank writes its checkpoint shards there
        run_dir = ctx.broadcast(report.make_run_dir(config) if ctx.main else None)
    metrics = report.MetricsLog(run_dir / report.METRICS) if ctx.main else None
    if ctx.main:
        report.write_config(run_dir, config)
    # before wrapping: FSDP turns the weights into shards (telemetry counts them whole)
    telemetry = Telemetry(config, umm, device, run_dir, world=ctx.world, enabled=ctx.main)

    def log(row):
        if ctx.main:
            metrics.write(row)
            telemetry.scalars(row, row["step"])

    before = None
    if resume_from is None and ctx.main:   # the weights are the same everywhere: rank 0 alone
        before = evaluate(umm, held, factory, text, device, impl, autocast)
        log({"event": "eval", "when": "before", "step": 0, **before})
    ctx.barrier()
    model, sync = distributed.wrap(umm, ctx)
    optimizer, schedule = build_optimizer(umm, config, device)
    params = [p for p in umm.parameters() if p.requires_grad]
    start, skipped = 0, {}
    if resume_from is not None:
        state = ckpt.load(resume_from, model=umm, optimizer=optimizer, scheduler=schedule,
                          rank=ctx.rank)
        start, before = state["step"], state["eval_before"]
        skipped = state.get("skipped_steps", {})
        if not data.load_state_dict(state["data_state"]):
            if ctx.main:   # slower with real data: every image read so far is read again
                print(f"replaying the data stream to step {state['data']['steps']} (the "
                      f"checkpoint holds no data position this run can continue)", flush=True)
            for _ in range(state["data"]["steps"]):   # replay the data stream to its position
                data.step()
        if ctx.main:
            print(f"resuming from {ckpt.describe(resume_from)} in {run_dir}", flush=True)
            # the later checkpoints' timeline is abandoned: out of `auto`'s way, kept. Before
            # the metrics are cut: a kill in between must not leave `auto` a later
            # checkpoint whose metrics rows are gone (a gap in the curve)
            for old, new in ckpt.abandon_newer(run_dir, start):
                print(f"moved the later checkpoint {old.name} out of the way to {new} (its "
                      f"timeline is abandoned: this run continues from step {start})",
                      flush=True)
            metrics.rows = _rows_until(run_dir / report.METRICS, start)
        ckpt.set_rng_state(state["rng"])       # last: nothing random may run after it

    lambdas = umm.task_weights
    steps, log_every, every = config.optim.steps, config.run.log_every, config.run.checkpoint_every
    tracker = LossTracker(device, config.run.max_skipped_steps, **skipped)
    bar = _progress(config, steps, start, enabled=ctx.main)
    for step in range(start + 1, steps + 1):
        packs = data.step()
        counts = ctx.all_reduce(distributed.step_counts(packs, telemetry.step_flops(packs)))
        task_counts = counts[:len(TASKS)]
        global_weight = to_device(task_counts.float(), device)
        telemetry.add_flops(float(counts[distributed.FLOPS]))   # host tensor: no device sync
        loss_sum = torch.zeros(len(TASKS), device=device)
        for i, pack in enumerate(packs):
            with sync(i == len(packs) - 1):
                with autocast():
                    out = model(pack.to(device), impl)
                step_objective(out, global_weight, lambdas, ctx.world).backward()
            loss_sum = loss_sum + out.task_loss_sum.detach().float()
        distributed.drop_unused_grads(umm, task_counts)
        # the global gradient norm, every step (clipping to --grad-clip, or to inf: none)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip or math.inf)
        if hasattr(grad_norm, "full_tensor"):   # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        # every rank sees the global sums and norm, so every rank skips the same steps
        loss_sum = ctx.all_reduce(loss_sum)
        finite = torch.isfinite(grad_norm) & torch.isfinite(loss_sum).all()
        lr = schedule.get_last_lr()[0]
        optimizer_step(optimizer, finite)   # skipped, on the device, when not finite
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tracker.add(step, loss_sum, global_weight, int(counts[distributed.TOKENS]), grad_norm,
                    finite)
        save = bool(every) and (step % every == 0 or step == steps)
        if step % log_every == 0 or step == steps or save or telemetry.due(step):
            try:
                row = tracker.flush(run_dir)   # raises NonFiniteLoss before anything is written
            except NonFiniteLoss as stop:   # (on every rank: the sums it judges are global)
                # every non-finite step was skipped: the weights are sound, keep them
                try:
                    _export_weights(run_dir, umm, ctx, config, step, images)
                except ckpt.CheckpointError as failed:   # the stop's cause stays the news
                    stop.args = (f"{stop.args[0].split(', and its weights')[0]}; writing its "
                                 f"weights failed too: {failed}",)
                raise
            row.update(event="train", step=step, lr=lr)
            if ctx.world > 1:
                row["world_size"] = ctx.world
            skipped = ctx.sum_counters(data.skipped) if config.data.data else {}
            row.update({f"skipped/{k}": v for k, v in skipped.items()})   # real data
            if telemetry.due(step):
                row.update(telemetry.readings())
            log(row)
            bar.set_postfix_str(_postfix(row), refresh=False)
        if save:
            ckpt.save(run_dir, step=step, model=umm, optimizer=optimizer, scheduler=schedule,
                      config=config, keep=config.run.keep_checkpoints,
                      extra={"eval_before": before, "skipped_steps": tracker.state()},
                      ctx=ctx, data_state=data.state_dict())
            if step < steps:   # the last step's weights are exported below, gathered once
                _export_weights(run_dir, umm, ctx, config, step, images)
            tracker.start = time.perf_counter()   # tokens/s times training, not the save
        bar.update()
    bar.close()

    weights = distributed.full_trainable_state(umm, ctx)   # every rank joins the gather
    failure: Optional[OSError] = None
    if ctx.main:
        try:   # e.g. the disk is full: a clean error, the resumable checkpoints intact
            # the weights first: a failure in the evaluation (out of memory, say) must not
            # lose a run that wrote no resumable checkpoint (--checkpoint-every 0)
            report.save_checkpoint(run_dir, weights, config, steps, images)
        except OSError as exc:
            failure = exc
    if ctx.main and failure is None:
        if ctx.sharded:   # rank 0 cannot run a sharded model alone: evaluate a whole copy
            umm, *_ = build_model(config)
            umm.load_state_dict(weights, strict=False)
            umm.to(device).train()
        after = evaluate(umm, held, factory, text, device, impl, autocast)
        try:
            log({"event": "eval", "when": "after", "step": steps, **after})
            parallel = f", {ctx.mode} x{ctx.world}" if ctx.world > 1 else ""
            report.plot_losses(metrics.rows, run_dir / report.CURVES,
                               f"{config.preset} / {config.model.family} / {config.data.recipe} "
                               f"({impl}{parallel})")
            summary = report.summary(config, metrics.rows, before, after,
                                     time.perf_counter() - wall, impl)
            print(report.write_summary(run_dir, summary), flush=True)
            metrics.finish()   # rows a full disk held back earlier: written now, or an error
        except OSError as exc:
            failure = exc
    telemetry.close()
    ctx.barrier()
    if failure is not None:
        raise _output_error(run_dir, "the run's final outputs (checkpoint.pt, metrics, "
                                     "summary)", failure) from failure
    return run_dir if ctx.main else None


def _output_error(run_dir: Path, what: str, exc: OSError) -> ckpt.CheckpointError:
    latest = ckpt.latest(run_dir)
    kept = (f"the resumable checkpoint {latest} is intact" if latest
            else "no resumable checkpoint was written (--checkpoint-every N)")
    return ckpt.CheckpointError(f"could not write {what} in {run_dir}: {exc}; {kept}")


def _export_weights(run_dir: Path, umm, ctx: distributed.Context, config: Config, step: int,
                    images) -> None:
    """checkpoint.pt (the trainable weights alone, for evaluation / export) next to the
    resumable checkpoints; a collective under FSDP. A failure to write it (rank 0) stops
    every rank with a CheckpointError; the resumable checkpoint just written is intact."""
    weights = distributed.full_trainable_state(umm, ctx)
    failure: Optional[OSError] = None
    if ctx.main:
        try:
            report.save_checkpoint(run_dir, weights, config, step, images)
        except OSError as exc:
            failure = exc
    if ctx.any_failed(failure is not None):   # every rank stops together
        raise _output_error(run_dir, report.CHECKPOINT,
                            failure or OSError("rank 0 failed to write it")) from failure


def _rows_until(path: Path, step: int) -> List[Dict]:
    """The metrics rows a resumed run keeps (the eval before training and the training rows
    up to the checkpoint's step); the file is rewritten to hold exactly those."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else ():
        try:   # a line torn by a kill (or a full disk) mid-append is dropped
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    kept = [r for r in rows if (r.get("event") == "eval" and r.get("when") == "before")
            or (r.get("event") == "train" and r.get("step", 0) <= step)]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    report.atomic_write(path, lambda fh: fh.write(text.encode()))
    return kept


def _progress(config: Config, steps: int, initial: int = 0, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(total=steps, initial=initial, desc=f"{config.model.family}/{config.data.recipe}",
                unit="step", disable=not (config.run.progress and enabled), dynamic_ncols=True)


def _postfix(row: Dict[str, Optional[float]]) -> str:
    parts = [f"{SHORT[t]}={row[f'loss/{t}']:.3f}" for t in TASKS if row.get(f"loss/{t}") is not None]
    return " ".join(parts + [f"{row['tokens_per_s']:.0f} tok/s"])
