"""`python -m trainer --estimate`: the wall-clock of a whole recipe, projected from timed
steps on this machine's device, for the fast (fused Triton) and the plain path.

    python -m trainer --estimate --recipe unimrg-harmon-1.5b --gpus 8
    python -m trainer --estimate --preset tiny --paths plain   # a CPU: seconds (the
                                                               # fast path: the interpreter)

The model is built at the recipe's preset with random weights (weights do not change the
time of a step); the Qwen2.5 presets tie the LM head to the input embeddings as the real
models do, so the trained parameters, their AdamW state and the all-reduce count that
vocab x hidden matrix once. One micro-batch per GPU is timed: the recipe's samples per GPU (16 for
Harmon, four of each task, task-interleaved), with text of the lengths DESIGN.md section 5
gives for real data (answers 32-512 tokens, prompts 8-48, drawn with a fixed seed; the
synthetic scenes' own text is a few tokens), packed into --pack-tokens packs. The timed
step is every pack's forward, ONE joint_loss per pack, backward, clipping and AdamW, after
untimed warm-up steps. `--paths fast-hf-decoder` also times the fast path with the
decoder's own RMSNorm / SwiGLU / rotary code instead of the fused ops (unimrg_fast.hf), so
one run shows what those add.

What an iteration is: the released recipe (Harmon's mmengine loop, accumulative_counts = 4)
counts one single-task micro-batch of 16 samples per GPU on 8 GPUs as an iteration, and
steps AdamW every 4 of them. So the recipe's 10,000 iterations are 10,000 micro-batches per
GPU at 8 GPUs; the global batch of an iteration (8 x 16 samples) is kept for any --gpus N,
each GPU doing 8 / N micro-batches. Timing AdamW with every micro-batch over-counts it by
the 3 in 4 micro-batches that only accumulate (a few ms of a step).

Projection, per GPU (data parallel):

    wall = iterations x (8 / N) x step time x buffer-token factor + iterations x all-reduce

All-reduce: the fp32 gradients of the trainable weights (4 bytes each) over a ring,
2 (N - 1) / N x bytes / bus bandwidth, at a stated 400 GB/s (NVLink on 8 H100 / H200,
nccl-tests' order of magnitude), charged in full as if it never overlapped the backward
pass (an upper bound; DDP and FSDP overlap most of it). Charged once per iteration, an
upper bound again for the 3 in 4 micro-batches that only accumulate.

Image tokens: Harmon has 1,088 per image (1,024 MAR latents + 64 buffer tokens). The
trainer's closest shape is 1,024 (128-px scenes, 4-px patches) for the condition image and
the target image, without the buffer tokens; the step time measured at that shape is scaled
by the ratio of the micro-batch's executed FLOPs (trainer/telemetry.py's FlopModel, plus
the packs' padding, which the step runs like any slot) with and without the 64 buffer
tokens in every image span, the grown samples packed again: attention grows with the
square of a sample's length, and buffer tokens that fit in the packs' padding cost no
more decoder work; the step time is taken to follow the executed FLOPs.

Not modelled (printed with the projection): Harmon's MAR-H encoder / decoder and KL-16 VAE
around the LLM (the trainer's model has a ViT, a projector and a diffusion MLP instead);
data loading; evaluation and checkpoints.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

ESTIMATE_RECIPES = {
    # name: preset, family, data recipe, samples per GPU per micro-batch, iterations,
    #       the paper's reported wall-clock (hours), the target (hours) for the fast path
    "unimrg-harmon-1.5b": dict(preset="qwen2.5-1.5b", family="mar", recipe="unimrg",
                               samples=16, iterations=10_000, paper_hours=(3, 8),
                               target_hours=3.0, image_tokens=1_088, buffer_tokens=64),
    "unimrg-harmon-0.5b": dict(preset="qwen2.5-0.5b", family="mar", recipe="unimrg",
                               samples=16, iterations=10_000, paper_hours=(3, 8),
                               target_hours=3.0, image_tokens=1_088, buffer_tokens=64),
}
RECIPE_GPUS = 8                # the released recipe's data-parallel GPUs
# --paths: name -> (impl of attention and the losses, impl of the decoder's RMSNorm /
# SwiGLU / rotary (None: the same), label). "fast-hf-decoder" isolates what the fused
# decoder ops (unimrg_fast.hf) add to the fast path.
PATHS = {"fast": ("triton", None, "fast (fused Triton)"),
         "fast-hf-decoder": ("triton", "reference", "fast, HF decoder ops (--no-fused-decoder)"),
         "plain": ("reference", None, "plain (PyTorch reference)")}
BUS_BANDWIDTH = 400e9          # bytes/s, a stated assumption (see the module docstring)
ANSWER_TOKENS = (32, 512)      # DESIGN.md section 5: real understanding answers
PROMPT_TOKENS = (8, 48)        # and generation prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer --estimate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--estimate", action="store_true", help="this mode")
    p.add_argument("--recipe", default="unimrg-harmon-1.5b", metavar="NAME",
                   help=f"one of {', '.join(ESTIMATE_RECIPES)} (default unimrg-harmon-1.5b)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="model shapes instead of the recipe's (tiny: a CPU check)")
    p.add_argument("--gpus", type=int, default=RECIPE_GPUS, metavar="N",
                   help=f"data-parallel GPUs, a divisor of {RECIPE_GPUS}: each does "
                        f"{RECIPE_GPUS} / N micro-batches per iteration (default {RECIPE_GPUS})")
    p.add_argument("--samples-per-gpu", type=int, default=None, metavar="N",
                   help="samples per GPU per micro-batch (default: the recipe's)")
    p.add_argument("--iterations", type=int, default=None, metavar="N",
                   help="iterations of the recipe: micro-batches per GPU at 8 GPUs "
                        "(default: the recipe's)")
    p.add_argument("--pack-tokens", type=int, default=None, metavar="N",
                   help="tokens per pack (default: the preset's)")
    p.add_argument("--warmup-steps", type=int, default=2, metavar="N", help="untimed steps")
    p.add_argument("--timed-steps", type=int, default=3, metavar="N", help="timed steps")
    p.add_argument("--paths", default="fast,plain", metavar="fast,plain",
                   help=f"which paths to time, comma-separated, of {', '.join(PATHS)} "
                        f"(fast-hf-decoder: the fast path with the model's own norm / MLP / "
                        f"rotary code)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute decoder activations (less memory)")
    return p


def _fail(parser: argparse.ArgumentParser, message: str):
    parser.error(message)   # exit code 2


def main(argv: List[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from trainer.config import PRESETS

    if args.recipe not in ESTIMATE_RECIPES:
        _fail(parser, f"--recipe: unknown estimate recipe {args.recipe!r}; allowed values: "
                      f"{', '.join(ESTIMATE_RECIPES)}")
    if args.preset is not None and args.preset not in PRESETS:
        _fail(parser, f"--preset: unknown value {args.preset!r}; allowed values: "
                      f"{', '.join(PRESETS)}")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths or any(p not in PATHS for p in paths):
        _fail(parser, f"--paths: allowed values: {', '.join(PATHS)} (comma-separated), "
                      f"got {args.paths!r}")
    for name in ("gpus", "timed_steps", "samples_per_gpu", "iterations", "pack_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            _fail(parser, f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    if args.warmup_steps < 0:
        _fail(parser, f"--warmup-steps: must be >= 0, got {args.warmup_steps}")
    if RECIPE_GPUS % args.gpus:
        _fail(parser, f"--gpus: must divide the recipe's {RECIPE_GPUS} GPUs (its global batch "
                      f"is kept: each GPU does {RECIPE_GPUS} / N micro-batches), got {args.gpus}")
    import torch

    cuda = torch.cuda.is_available()
    if any(PATHS[p][0] == "triton" for p in paths) and not cuda:
        os.environ["TRITON_INTERPRET"] = "1"   # before unimrg_fast is imported
    recipe = ESTIMATE_RECIPES[args.recipe]
    preset = args.preset or recipe["preset"]
    samples = args.samples_per_gpu if args.samples_per_gpu is not None else recipe["samples"]
    iterations = args.iterations if args.iterations is not None else recipe["iterations"]
    from trainer.config import ConfigError

    try:
        results = estimate(preset, recipe, samples, args.pack_tokens, paths, args.warmup_steps,
                           args.timed_steps, args.gradient_checkpointing)
    except ConfigError as exc:   # e.g. --pack-tokens below the longest sample
        _fail(parser, str(exc))
    print(report(args.recipe, recipe, preset, samples, iterations, args.gpus, results))
    return 0


def _packs(config, factory, pad_id: int, samples: int):
    """One micro-batch: `samples` samples of the recipe's task cycle with real-data text
    lengths, packed first-fit decreasing into --pack-tokens packs (host packs)."""
    from trainer.data import pack_all

    cycle = config.data.task_cycle
    rng = np.random.default_rng(0)
    counts: Dict[str, int] = {}
    batch = []
    for i in range(samples):
        task = cycle[i % len(cycle)]
        sample = factory.train_sample(task, counts.get(task, 0))
        batch.append(with_text_length(sample, rng, factory.text.vocab_size))
        counts[task] = counts.get(task, 0) + 1
    return pack_all(factory, batch, config.data.pack_tokens, pad_id, "micro-batch")


def with_text_length(sample, rng: np.random.Generator, vocab_size: int):
    """The sample with its text span grown to a real-data length (DESIGN.md section 5):
    an understanding sample's answer to ANSWER_TOKENS, a generation sample's prompt to
    PROMPT_TOKENS, by random tokens appended to the end of its causal span (the answer's
    new tokens are scored like the rest of it). Never shorter than it was."""
    from trainer.data import UND

    low, high = ANSWER_TOKENS if sample.task == UND else PROMPT_TOKENS
    spans = list(sample.spans)
    text = max(i for i, (_, mode) in enumerate(spans) if mode == "causal")
    end = sum(n for n, _ in spans[:text + 1])
    current = len(sample.label_ids) if sample.task == UND else spans[text][0]
    extra = max(0, int(rng.integers(low, high + 1)) - current)
    ids = rng.integers(0, vocab_size, extra, dtype=np.int64)
    spans[text] = (spans[text][0] + extra, "causal")
    grown = dataclasses.replace(sample, spans=tuple(spans),
                                input_ids=np.insert(sample.input_ids, end, ids))
    if sample.task == UND:   # position p predicts token p + 1
        grown.label_rows = np.concatenate([sample.label_rows, end - 1 + np.arange(extra)])
        grown.label_ids = np.concatenate([sample.label_ids, ids])
    else:
        grown.target_start = sample.target_start + extra
    return grown


def executed_work(flops, pack) -> float:
    """FLOPs the timed step runs for one pack: its model FLOPs (FlopModel.pack) plus the
    padding's share, which the decoder's projections run over like any slot and the
    attention kernels like any (causal) sample."""
    real = len(pack.sample_tasks)
    return (flops.pack(pack)
            + flops.decoder * (pack.layout.num_tokens - pack.num_real_tokens)
            + flops.attn_pair * (pack.layout.attended_pairs() - pack.layout.attended_pairs(real)))


def buffer_token_factor(flops, packs, buffer: int, pack_tokens: int) -> float:
    """The executed work of the micro-batch with `buffer` more tokens in every image span
    (the condition image and a generation target) over its executed work without them.

    Executed, not model FLOPs: the timed step runs the decoder over every slot of its
    packs, padding included, so buffer tokens that fit in the packs' padding add only
    their attention (and the padding's attention shrinks), while ones that need another
    pack add a whole pack's work. The grown samples are packed again as the trainer packs
    a micro-batch (first-fit decreasing into --pack-tokens packs)."""
    from trainer.config import ConfigError
    from trainer.data import UND
    from unimrg_fast.layout import CAUSAL, MODES, PackedLayout
    from unimrg_fast.packing import pack_first_fit_decreasing

    if not buffer:
        return 1.0
    base = grown = 0.0
    samples = []
    for pack in packs:
        real = len(pack.sample_tasks)
        base += executed_work(flops, pack)
        # the work that does not depend on how the samples are packed: the heads, and per
        # image the ViT / projector and the generation input
        targets = sum(1 for t in pack.sample_tasks if t != UND)   # generation samples
        grown += (flops.pack(pack) - flops.decoder * pack.num_real_tokens
                  - flops.attn_pair * pack.layout.attended_pairs(real)
                  + (flops.projector + flops.vit_token) * buffer * real
                  + flops.gen_input * buffer * targets)
        samples += [[(n + buffer if mode != CAUSAL else n, MODES[mode]) for n, mode in sample]
                    for sample in pack.layout.spans[:real]]
    lengths = [sum(n for n, _ in sample) for sample in samples]
    if max(lengths) > pack_tokens:
        raise ConfigError("--pack-tokens", f"with {buffer} buffer tokens per image a sample "
                                           f"is {max(lengths)} tokens, longer than a "
                                           f"{pack_tokens}-token pack")
    where = pack_first_fit_decreasing(lengths, pack_tokens)
    for p in range(int(where.max()) + 1):
        layout = PackedLayout.from_spans([samples[i] for i in np.flatnonzero(where == p)],
                                         pad_to=pack_tokens)
        grown += flops.decoder * layout.num_tokens + flops.attn_pair * layout.attended_pairs()
    return grown / base


def estimate(preset: str, recipe: Dict, samples: int, pack_tokens: Optional[int],
             paths: List[str], warmup: int, timed: int, checkpointing: bool) -> Dict:
    import torch

    from trainer.config import build_config
    from trainer.data import SampleFactory
    from trainer.loop import autocast_for, build_optimizer
    from trainer.model import build_model
    from trainer.telemetry import FlopModel
    from unimrg_fast import backends

    overrides = {"family": recipe["family"], "recipe": recipe["recipe"], "eval_questions": 0,
                 "eval_scenes": 0, "gradient_checkpointing": checkpointing}
    if pack_tokens:
        overrides["pack_tokens"] = pack_tokens
    config = build_config(preset, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and config.run.cpu_threads:
        torch.set_num_threads(config.run.cpu_threads)
    model, text, images, cond = build_model(config)
    check_host_memory(model, device, preset)
    model.to(device).train()
    factory = SampleFactory(config, text, images, cond)
    host_packs = _packs(config, factory, text.pad_id, samples)
    packs = [p.to(device) for p in host_packs]
    tokens = sum(p.num_real_tokens for p in packs)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = autocast_for(config, device)
    # Harmon's images are buffer tokens longer than the trainer builds them: added where
    # the preset's image has the rest of Harmon's image tokens (not on tiny's small one)
    buffer = (recipe["buffer_tokens"] if config.model.target_tokens + recipe["buffer_tokens"]
              == recipe["image_tokens"] else 0)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "tokens": tokens, "packs": len(packs), "pack_tokens": config.data.pack_tokens,
           "image_tokens": config.model.target_tokens,
           "answer_rows": sum(p.text_rows.shape[0] for p in host_packs),
           # parameters() yields a tied LM head's weight once (it is the embeddings')
           "params": sum(p.numel() for p in model.parameters()),
           "trainable": sum(p.numel() for p in params), "tied": model.tied,
           "buffer_tokens": buffer,
           "buffer_factor": buffer_token_factor(FlopModel.from_model(model), host_packs, buffer,
                                                 config.data.pack_tokens),
           "paths": {}}
    # a host copy, so the timed paths' peak memory is a training run's
    weights = host_copy(model.state_dict())
    for path in paths:
        impl, model.decoder_impl, _ = PATHS[path]
        if impl == "triton" and not backends.triton().available:
            out["paths"][path] = {"error": f"Triton unavailable: {backends.triton().detail}"}
            continue
        model.load_state_dict(weights)
        optimizer, _ = build_optimizer(model, config, device)
        step = train_step(model, optimizer, packs, impl, autocast, config.optim.grad_clip)
        try:
            for _ in range(warmup):
                step()
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(timed):
                step()
            _sync(device)
            seconds = (time.perf_counter() - start) / timed
            entry = {"step_s": seconds}
            if device.type == "cuda":
                entry["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            out["paths"][path] = entry
        except torch.cuda.OutOfMemoryError as exc:
            model.zero_grad(set_to_none=True)
            out["paths"][path] = {"error": f"out of GPU memory ({str(exc).splitlines()[0]}); "
                                           f"try --gradient-checkpointing"}
        optimizer.state.clear()   # free the AdamW moments before the next path
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def train_step(model, optimizer, packs: Sequence, impl: str, autocast, grad_clip: float):
    """step() -> the mean loss over `packs` (a device tensor, no sync): one micro-batch of
    the trainer without its bookkeeping: every pack's forward and ONE joint_loss (under
    `impl`, "triton" or "reference"), backward, clipping, AdamW. What --estimate times,
    and the train-step benchmark too."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        total = 0.0
        for pack in packs:
            with autocast():
                loss = model.loss(pack, impl)
            (loss.total / len(packs)).backward()
            total = total + loss.total.detach() / len(packs)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return step


def host_copy(state: Dict) -> Dict:
    """The state dict's tensors copied to the host, a tensor listed under several keys (a
    tied LM head's matrix is the embeddings') copied once and shared, as in the model."""
    copies: Dict[tuple, object] = {}
    out = {}
    for key, value in state.items():
        ident = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if ident not in copies:
            copies[ident] = value.detach().to("cpu", copy=True)
        out[key] = copies[ident]
    return out


def host_memory_available() -> Optional[int]:
    """Bytes of host memory the kernel says can be had without swapping (MemAvailable),
    or None where /proc/meminfo is not there to ask."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_host_memory(model, device, preset: str, available: Optional[int] = None) -> None:
    """Refuses, before anything is timed, an estimate whose host memory cannot hold what
    it allocates beyond the model: a copy of the weights on the host (to restart every
    path from them), and on a CPU also the gradients and AdamW's two moments. Without
    this a CPU run of the real recipe (Qwen2.5-1.5B: ~30 GB) is killed by the kernel's
    OOM killer, printing nothing. Activations come on top: this is a lower bound."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    needed = weights + (3 * trained if device.type == "cpu" else 0)
    available = host_memory_available() if available is None else available
    if available is None or needed <= available:
        return
    from trainer.config import ConfigError

    gib = 2 ** 30
    where = ("the weights' host copy, gradients and AdamW moments" if device.type == "cpu"
             else "the weights' host copy")
    raise ConfigError("--preset", f"the estimate at preset {preset} needs at least "
                                  f"{needed / gib:.1f} GiB of host memory for {where} "
                                  f"(beyond the model's {weights / gib:.1f} GiB), and "
                                  f"{available / gib:.1f} GiB are available; run it on a GPU "
                                  f"machine with more memory, or check the tool with "
                                  f"--preset tiny")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allreduce_seconds(trainable: int, gpus: int) -> float:
    """One ring all-reduce of the fp32 gradients at BUS_BANDWIDTH (0 on one GPU)."""
    return 2 * (gpus - 1) / gpus * 4 * trainable / BUS_BANDWIDTH


def report(name: str, recipe: Dict, preset: str, samples: int, iterations: int, gpus: int,
           r: Dict) -> str:
    scale = r["buffer_factor"]
    micro = RECIPE_GPUS // gpus
    reduce_s = allreduce_seconds(r["trainable"], gpus)
    lines = [
        f"time budget of {name} ({recipe['recipe']} recipe, {recipe['family']} family) at "
        f"preset {preset}, on {r['device']}",
        f"  micro-batch per GPU: {samples} samples = {r['tokens']:,} real tokens in "
        f"{r['packs']} pack(s) of {r['pack_tokens']:,}; {r['image_tokens']:,} tokens per "
        f"image; {r['answer_rows']:,} answer tokens (real-data text lengths); "
        f"{_count(r['params'])} parameters, {_count(r['trainable'])} trained (random weights"
        f"{'; LM head tied to the input embeddings' if r.get('tied') else ''})",
    ]
    if r["buffer_tokens"]:
        lines.append(f"  Harmon has {r['image_tokens'] + r['buffer_tokens']:,} tokens per image "
                     f"(+{r['buffer_tokens']} buffer tokens, not built): step times scaled by "
                     f"x{scale:.3f}, the step's executed FLOPs (padding included) with / "
                     f"without them, the grown samples packed again")
    # The target is the recipe's: at its preset, samples, iterations and GPUs only
    recipes_run = (preset == recipe["preset"] and samples == recipe["samples"]
                   and iterations == recipe["iterations"] and gpus == RECIPE_GPUS)
    whole = "the whole recipe" if recipes_run else f"{iterations:,} iterations"
    batch = ("the recipe's global micro-batch" if samples == recipe["samples"]
             else f"the recipe's has {recipe['samples']} per GPU")
    lines.append(f"  projection: an iteration is {RECIPE_GPUS} x {samples} samples ({batch}); "
                 f"on {gpus} GPU(s) each does {micro} micro-batch(es) of "
                 f"it: wall = {iterations:,} iterations x {micro} x step time"
                 + (f" + {iterations:,} x {reduce_s * 1e3:.0f} ms all-reduce of "
                    f"{4 * r['trainable'] / 1e9:.1f} GB fp32 gradients at a stated "
                    f"{BUS_BANDWIDTH / 1e9:.0f} GB/s, never overlapped (an upper bound)"
                    if gpus > 1 else ""))
    lo, hi = recipe["paper_hours"]
    interpreted = r["device"] == "cpu"
    labels = {path: label + (" on the Triton interpreter" if impl == "triton" and interpreted
                             else "") for path, (impl, _, label) in PATHS.items()}
    width = max(len(label) for label in labels.values())   # the figures line up
    for path, label in labels.items():
        entry = r["paths"].get(path)
        if entry is None:
            continue
        if "error" in entry:
            lines.append(f"  {label:<{width}} not timed: {entry['error']}")
            continue
        step_s = entry["step_s"] * scale
        hours = iterations * (micro * step_s + reduce_s) / 3600
        mem = f", peak {entry['peak_gib']:.1f} GiB" if "peak_gib" in entry else ""
        verdict = ""
        if path == "fast" and not recipes_run:
            verdict = (f"; the < {recipe['target_hours']:g} h target applies at "
                       f"{recipe['preset']}, {recipe['samples']} samples per GPU and "
                       f"{recipe['iterations']:,} iterations on {RECIPE_GPUS} GPUs only")
        elif path == "fast":
            meets = hours < recipe["target_hours"]
            verdict = (f"; target < {recipe['target_hours']:g} h: "
                       f"{'MET' if meets else 'NOT MET'}")
        lines.append(f"  {label:<{width}} {step_s:.3f} s/step{mem} -> projected {_hours(hours)} for "
                     f"{whole}{verdict}")
    lines.append("  not modelled: Harmon's MAR-H encoder / decoder and VAE around the LLM "
                 "(a ViT, projector and diffusion MLP stand in), data loading, evaluation, "
                 "checkpoints")
    lines.append(f"  (the paper reports {lo}-{hi} h; projections from a {r['device']} apply to "
                 f"that device only)")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _hours(h: float) -> str:
    if not math.isfinite(h):
        return "inf"
    return f"{h:.2f} h" if h < 100 else f"{h:,.0f} h"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
