"""`python -m trainer`: UniMRG / SGT post-training of a unified multimodal model.

The configuration is read and checked first (a bad value exits with code 2 before any
work starts). Then, if --fast-kernels is asked for on a machine without CUDA, the Triton
interpreter is switched on: TRITON_INTERPRET must be set before unimrg_fast defines its
kernels, which is why nothing here imports unimrg_fast (or the trainer modules that do)
until that decision is made.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from trainer.config import (DEVICES, FAMILIES, PARALLEL, PRECISIONS, PRESETS, RECIPES, SCHEDULES,
                            SECTIONS, SEG_STYLES, TASKS, ConfigError, build_config, field_docs,
                            flag_of, flatten_overrides, load_file)

# Shown in --help; the values are checked by the config (so a YAML file gets the same message).
METAVARS = {"family": FAMILIES, "recipe": RECIPES, "schedule": SCHEDULES, "seg_style": SEG_STYLES,
            "device": DEVICES, "precision": PRECISIONS, "parallel": PARALLEL}

DESCRIPTION = """\
UniMRG / SGT post-training of a unified multimodal model (UMM): a Qwen2 decoder with a
frozen SigLIP encoder learns to answer questions about an image (understanding) and to
generate the image's pixels, depth map and segmentation map (UniMRG's intrinsic
representations), all tasks packed into the same sequences."""

EPILOG = f"""\
recipes (--recipe):
  unimrg   und + pixel + depth + seg, lambda 1 each (UniMRG; white-on-black boundaries)
  sgt      seg + und at 2:1 samples, coloured instance masks as targets (SGT)
  sft      understanding only: the paper's baseline
  --tasks und,depth trains any subset ({', '.join(TASKS)}) instead.

families (--family):
  ar       Show-o-like: k-means image codes, masked-token cross-entropy
  mar      Harmon-like: patch latents, per-token MLP diffusion head, DDPM eps-prediction
  flow     OpenUni / BAGEL-like: noisy latents in a noise span, flow-matching velocity

presets (--preset): {', '.join(PRESETS)}. tiny (the default) is sized for a 2-core
CPU: seconds on the plain path, minutes with --fast-kernels (the Triton interpreter). It
sets --lr 3e-3: UniMRG's 1e-5 is for fine-tuning a pretrained model, and a randomly
initialised tiny model needs more to show learning in 30 steps. The Qwen2.5 presets are
those models' shapes with random weights (UniMRG's hyper-parameters, 16k-token packs, for
GPUs; the LM head tied to the input embeddings, as in those models); --llm PATH post-trains
a local Qwen2 checkpoint instead (with its tokenizer and, unless --[no-]tie-word-embeddings
says otherwise, its own tying).

Settings apply in order: the preset, then --config FILE (YAML or TOML, flat keys such as
`lr: 1e-4` or by section `optim: {{lr: 1e-4}}`), then flags.

outputs: a run directory under --out (a timestamped folder, named by the last line
printed) with metrics.jsonl, loss_curves.png, summary.txt / summary.json (held-out
understanding accuracy and per-task losses before and after training), checkpoint.pt
(trainable weights + config) and config.yaml; with --checkpoint-every N also resumable
checkpoints/step-N directories (--resume PATH|auto, --keep-checkpoints K).

time budget: python -m trainer --estimate --recipe unimrg-harmon-1.5b --gpus 8 projects the
recipe's wall-clock from timed steps (python -m trainer --estimate --help).

examples:
  python -m trainer --fast-kernels
  python -m trainer --family ar --recipe sgt --steps 100
  python -m trainer --tasks und,depth --schedule round-robin --config my.yaml"""


def _type_of(field: dataclasses.Field):
    hint = typing.get_type_hints(_owner(field))[field.name]
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is bool:
        return bool
    if origin is tuple:
        return str   # comma-separated; the dataclass parses it
    return hint


def _owner(field: dataclasses.Field):
    return next(cls for cls in SECTIONS.values() if field in dataclasses.fields(cls))


def _metavar(name: str, kind) -> str:
    if name in METAVARS:
        return "{" + ",".join(METAVARS[name]) + "}"
    if name == "tasks":
        return "TASK[,TASK...]"
    if name in ("llm", "vit", "out", "images", "depth_dir", "mask_dir"):
        return "PATH"
    if name == "data":
        return "DIR_OR_JSON"
    if name == "resume":
        return "PATH|auto"
    if name == "resume_dir":
        return "RUN_DIR"
    return {int: "N", float: "X"}.get(kind, name.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=DESCRIPTION,
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--preset", metavar="NAME",
                        help=f"starting configuration: {', '.join(PRESETS)} (default: tiny)")
    parser.add_argument("--config", metavar="FILE",
                        help="YAML / TOML file of settings applied over the preset")
    tiny = PRESETS["tiny"]()
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} settings", (cls.__doc__ or "").strip())
        docs = field_docs(cls)
        for field in dataclasses.fields(cls):
            kind = _type_of(field)
            default = getattr(getattr(tiny, section), field.name)
            if isinstance(default, tuple):
                default = ",".join(str(x) for x in default)
            help_text = f"{docs.get(field.name, '')} [tiny: {default}]".replace("%", "%%")
            if kind is bool:
                group.add_argument(flag_of(field.name), dest=field.name,
                                   action=argparse.BooleanOptionalAction, help=help_text)
            else:
                group.add_argument(flag_of(field.name), dest=field.name, type=kind,
                                   metavar=_metavar(field.name, kind), help=help_text)
    return parser


def parse_config(argv, parser: argparse.ArgumentParser):
    args = vars(parser.parse_args(argv))
    file_values = load_file(args.pop("config")) if "config" in args else {}
    # the flag over the file over tiny; an empty --preset '' is refused, not read as tiny
    preset = args.pop("preset") if "preset" in args else file_values.get("preset", "tiny")
    # flat keys: a flag overrides the file's value whether the file nests it or not
    return build_config(preset, {**flatten_overrides(file_values), **args})


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--estimate" in argv:   # its own flags: python -m trainer --estimate --help
        from trainer.estimate import main as estimate

        return estimate(argv)
    parser = build_parser()
    try:
        config = parse_config(argv, parser)
    except ConfigError as exc:
        parser.error(str(exc))   # exit code 2, before any work starts
    import torch

    cuda = torch.cuda.is_available() and config.run.device != "cpu"
    if config.run.fast_kernels and not cuda:
        os.environ["TRITON_INTERPRET"] = "1"
        print("--fast-kernels without a CUDA device: the Triton kernels run on the Triton "
              "interpreter (TRITON_INTERPRET=1): the same kernels, exact, much slower.", flush=True)
    from trainer.checkpoint import CheckpointError
    from trainer.loop import NonFiniteLoss, train   # imports unimrg_fast: after the switch

    try:
        run_dir = train(config)   # one process, or a rank of torchrun (trainer/distributed.py)
    except ConfigError as exc:   # found once the model is loaded (e.g. a ViT's token count)
        parser.error(str(exc))
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"run directory: {exc.run_dir}", flush=True)
        return 1
    except CheckpointError as exc:   # e.g. the disk is full: the previous one is intact
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if run_dir is not None:   # None: a distributed run's rank > 0
        print(f"run directory: {run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
