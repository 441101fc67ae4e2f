"""`python -m trainer --estimate`: the wall-clock of a whole recipe, projected from timed
steps on this machine's device, for the fast (fused Triton) and the plain path.

    python -m trainer --estimate --recipe unimrg-harmon-1.5b --gpus 8
    python -m trainer --estimate --preset tiny          # a CPU: seconds, for the tests

The model is built at the recipe's preset with random weights (weights do not change the
time of a step), the recipe's micro-batch of samples (16 per GPU for Harmon: four of each
task, task-interleaved) is packed into --pack-tokens packs, and one optimizer step (every
pack's forward, ONE joint_loss per pack, backward, clipping, AdamW) is timed after
warm-up steps that are excluded.

Projection (data parallel: each of the --gpus GPUs does its own micro-batch per
iteration, so the per-GPU step time is the iteration time):

    wall = step time x iterations x (1 + 5% for the gradient all-reduce when gpus > 1)

The 5% is a stated assumption, not a measurement: an all-reduce of the ~1.5e9 bf16
gradients (3 GB) over NVLink at ~400 GB/s bus bandwidth is ~15 ms per iteration, and
overlaps the backward pass in DDP / FSDP.

Image tokens: Harmon has 1,088 per image (1,024 MAR latents + 64 buffer tokens). The
trainer's closest shape is 1,024 (128-px scenes, 4-px patches) for the condition image
and the target image, without the 64 buffer tokens; the step time measured at that shape
is scaled up by the ratio of real tokens with and without the buffer tokens (linear in
tokens: an upper bound, since the attention part is quadratic only within a sample and
the rest is linear).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Dict, List, Optional

ESTIMATE_RECIPES = {
    # name: preset, family, data recipe, samples per GPU per micro-batch, iterations,
    #       the paper's reported wall-clock (hours), the target (hours) for the fast path
    "unimrg-harmon-1.5b": dict(preset="qwen2.5-1.5b", family="mar", recipe="unimrg",
                               samples=16, iterations=10_000, paper_hours=(3, 8),
                               target_hours=3.0, buffer_tokens=64),
    "unimrg-harmon-0.5b": dict(preset="qwen2.5-0.5b", family="mar", recipe="unimrg",
                               samples=16, iterations=10_000, paper_hours=(3, 8),
                               target_hours=3.0, buffer_tokens=64),
}
ALLREDUCE_OVERHEAD = 0.05


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer --estimate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--estimate", action="store_true", help="this mode")
    p.add_argument("--recipe", default="unimrg-harmon-1.5b", metavar="NAME",
                   help=f"one of {', '.join(ESTIMATE_RECIPES)} (default unimrg-harmon-1.5b)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="model shapes instead of the recipe's (tiny: a CPU check)")
    p.add_argument("--gpus", type=int, default=8, metavar="N", help="data-parallel GPUs")
    p.add_argument("--samples-per-gpu", type=int, default=None, metavar="N",
                   help="samples per GPU per micro-batch (default: the recipe's)")
    p.add_argument("--iterations", type=int, default=None, metavar="N",
                   help="optimizer steps of the recipe (default: the recipe's)")
    p.add_argument("--pack-tokens", type=int, default=None, metavar="N",
                   help="tokens per pack (default: the preset's)")
    p.add_argument("--warmup-steps", type=int, default=2, metavar="N", help="untimed steps")
    p.add_argument("--timed-steps", type=int, default=3, metavar="N", help="timed steps")
    p.add_argument("--paths", default="fast,plain", metavar="fast,plain",
                   help="which paths to time")
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
    if not paths or any(p not in ("fast", "plain") for p in paths):
        _fail(parser, f"--paths: allowed values: fast, plain (comma-separated), got {args.paths!r}")
    for name in ("gpus", "timed_steps"):
        if getattr(args, name) < 1:
            _fail(parser, f"--{name.replace('_', '-')}: must be >= 1")
    import torch

    cuda = torch.cuda.is_available()
    if "fast" in paths and not cuda:
        os.environ["TRITON_INTERPRET"] = "1"   # before unimrg_fast is imported
    recipe = ESTIMATE_RECIPES[args.recipe]
    preset = args.preset or recipe["preset"]
    samples = args.samples_per_gpu or recipe["samples"]
    iterations = args.iterations or recipe["iterations"]
    results = estimate(preset, recipe, samples, args.pack_tokens, paths, args.warmup_steps,
                       args.timed_steps, args.gradient_checkpointing)
    print(report(args.recipe, recipe, preset, samples, iterations, args.gpus, results))
    return 0


def _packs(config, factory, pad_id: int, samples: int):
    """One micro-batch: `samples` samples of the recipe's task cycle, packed first-fit
    decreasing into --pack-tokens packs."""
    from trainer.data import build_pack
    from unimrg_fast.packing import StreamingPacker

    cycle = config.data.task_cycle
    counts: Dict[str, int] = {}
    batch = []
    for i in range(samples):
        task = cycle[i % len(cycle)]
        batch.append(factory.train_sample(task, counts.get(task, 0)))
        counts[task] = counts.get(task, 0) + 1
    packer = StreamingPacker(config.data.pack_tokens)
    packer.add(range(len(batch)), [s.length for s in batch])
    channels = config.model.latent_channels if factory.family != "ar" else 0
    return [build_pack([batch[i] for i in group], config.data.pack_tokens, pad_id,
                       factory.cond_tokens, channels) for group in packer.pop_packs()]


def estimate(preset: str, recipe: Dict, samples: int, pack_tokens: Optional[int],
             paths: List[str], warmup: int, timed: int, checkpointing: bool) -> Dict:
    import torch

    from trainer.config import build_config
    from trainer.data import SampleFactory
    from trainer.loop import autocast_for, build_optimizer
    from trainer.model import build_model
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
    model.to(device).train()
    factory = SampleFactory(config, text, images, cond)
    host_packs = _packs(config, factory, text.pad_id, samples)
    packs = [p.to(device) for p in host_packs]
    tokens = sum(p.num_real_tokens for p in packs)
    # images per micro-batch: every sample's condition image + each generation target
    image_spans = sum(len(p.sample_tasks) + sum(1 for t in p.sample_tasks if t != 0)
                      for p in host_packs)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = autocast_for(config, device)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "tokens": tokens, "packs": len(packs), "pack_tokens": config.data.pack_tokens,
           "image_tokens": config.model.target_tokens, "image_spans": image_spans,
           "params": sum(p.numel() for p in model.parameters()), "paths": {}}
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for path in paths:
        impl = "triton" if path == "fast" else "reference"
        if impl == "triton" and not backends.triton().available:
            out["paths"][path] = {"error": f"Triton unavailable: {backends.triton().detail}"}
            continue
        model.load_state_dict(weights)
        optimizer, _ = build_optimizer(model, config, device)

        def step():
            for pack in packs:
                with autocast():
                    loss = model.loss(pack, impl)
                (loss.total / len(packs)).backward()
            torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

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


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report(name: str, recipe: Dict, preset: str, samples: int, iterations: int, gpus: int,
           r: Dict) -> str:
    buffer = recipe["buffer_tokens"] if preset == recipe["preset"] else 0
    scale = (r["tokens"] + buffer * r["image_spans"]) / r["tokens"]
    overhead = ALLREDUCE_OVERHEAD if gpus > 1 else 0.0
    lines = [
        f"time budget of {name} ({recipe['recipe']} recipe, {recipe['family']} family) at "
        f"preset {preset}, on {r['device']}",
        f"  micro-batch per GPU: {samples} samples = {r['tokens']:,} real tokens in "
        f"{r['packs']} pack(s) of {r['pack_tokens']:,}; {r['image_tokens']:,} tokens per "
        f"image; {_count(r['params'])} parameters (random weights)",
    ]
    if buffer:
        lines.append(f"  Harmon has {r['image_tokens'] + buffer:,} tokens per image (+{buffer} "
                     f"buffer tokens, not modelled): step times scaled by x{scale:.3f}")
    lines.append(f"  projection: {gpus} GPU(s) data parallel, each its own micro-batch, wall = "
                 f"step time x {iterations:,} iterations"
                 + (f" x {1 + overhead:.2f} (stated {overhead:.0%} all-reduce overhead)"
                    if overhead else ""))
    lo, hi = recipe["paper_hours"]
    for path in ("fast", "plain"):
        entry = r["paths"].get(path)
        if entry is None:
            continue
        label = "fast (fused Triton)" if path == "fast" else "plain (PyTorch reference)"
        if path == "fast" and r["device"] == "cpu":
            label = "fast (Triton interpreter)"
        if "error" in entry:
            lines.append(f"  {label:<27} not timed: {entry['error']}")
            continue
        step_s = entry["step_s"] * scale
        hours = step_s * iterations * (1 + overhead) / 3600
        mem = f", peak {entry['peak_gib']:.1f} GiB" if "peak_gib" in entry else ""
        verdict = ""
        if path == "fast" and preset != recipe["preset"]:
            verdict = f"; the < {recipe['target_hours']:g} h target applies at {recipe['preset']} only"
        elif path == "fast":
            meets = hours < recipe["target_hours"]
            verdict = (f"; target < {recipe['target_hours']:g} h: "
                       f"{'MET' if meets else 'NOT MET'}")
        lines.append(f"  {label:<27} {step_s:.3f} s/step{mem} -> projected {_hours(hours)} for "
                     f"the whole recipe{verdict}")
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
