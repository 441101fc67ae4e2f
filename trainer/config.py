"""Typed configuration of a post-training run (torchtitan style).

A run is one `Config`: four sections of dataclasses, each field documented by the string
under it (that string is also the field's `--help` text). Presets are functions that
return a whole `Config`; the command line applies, in order: the preset, a YAML / TOML
file (`--config`), then explicit flags. Every value is checked in `__post_init__`, so a
bad run fails before any work starts, with a `ConfigError` naming the flag.

This module imports neither torch nor unimrg_fast: the command line reads it before it
decides whether the Triton interpreter must be switched on (which has to happen before
unimrg_fast is imported).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import textwrap
from typing import Any, Dict, Optional, Tuple

TASKS = ("und", "pixel", "depth", "seg")
"""Task ids are positions in this tuple, fixed whatever the recipe (joint_loss num_tasks=4)."""
GEN_TASKS = TASKS[1:]
FAMILIES = ("ar", "mar", "flow")
RECIPES = ("unimrg", "sgt", "sft")
SCHEDULES = ("interleaved", "round-robin")
SEG_STYLES = ("auto", "edges", "colour")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL = ("ddp", "fsdp")
# Each recipe's sample mix: one cycle of tasks, repeated (sgt: two seg samples per und one).
RECIPE_CYCLES = {"unimrg": ("und", "pixel", "depth", "seg"), "sgt": ("seg", "seg", "und"),
                 "sft": ("und",)}
# The released UniMRG code's round-robin order of single-task micro-batches.
ROUND_ROBIN_ORDER = ("und", "depth", "pixel", "seg")


class ConfigError(ValueError):
    """A bad configuration value; `flag` is the command-line flag that sets it."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def flag_of(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _one_of(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(flag_of(name), f"unknown value {value!r}; allowed values: "
                                         f"{', '.join(allowed)}")


def _at_least(name: str, value: Any, low, kind=int) -> None:
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value < low:
        raise ConfigError(flag_of(name), f"must be {'an int' if kind is int else 'a number'} "
                                         f">= {low}, got {value!r}")


def _in_range(name: str, value: Any, low: float, high: float, *, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (low <= value and (value < high if high_open else value <= high)):
        bracket = ")" if high_open else "]"
        raise ConfigError(flag_of(name), f"must be in [{low}, {high}{bracket}, got {value!r}")


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:   # an int past float's range (1 followed by 400 zeros)
        return False


def _check_field_types(section) -> None:
    """Every field of a config section against its annotation, before the section's own
    checks: a config file can give any YAML / TOML value ("false" as text, 1.5 for a
    seed, NaN for a rate), and a value of the wrong kind must stop the run naming its
    flag, not train with it (a non-empty string is truthy) or fail in a comparison."""
    for f in dataclasses.fields(section):
        value, kind = getattr(section, f.name), str(f.type)
        optional = kind.startswith("Optional[")
        kind = kind[len("Optional["):-1] if optional else kind
        if value is None and optional:
            continue
        flag = flag_of(f.name)
        if kind == "bool" and not isinstance(value, bool):
            raise ConfigError(flag, f"must be true or false, got {value!r}")
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(flag, f"must be an integer, got {value!r}")
        if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                or not _finite(value)):
            raise ConfigError(flag, f"must be a finite number, got {value!r}")
        if kind == "str" and (not isinstance(value, str) or not value):
            raise ConfigError(flag, f"must be a non-empty string, got {value!r}")


@dataclasses.dataclass
class ModelConfig:
    """The unified multimodal model: a Qwen2 decoder, a frozen ViT, a generation side."""

    family: str = "mar"
    """Generation side: ar (Show-o-like: discrete k-means image codes, masked-token
    cross-entropy through an image-token head), mar (Harmon-like: continuous patch latents,
    per-token MLP diffusion head, DDPM eps-prediction), flow (OpenUni / BAGEL-like: noisy
    latents in a noise span, flow-matching velocity through a linear head)."""
    llm: Optional[str] = None
    """Path of a local Qwen2 checkpoint (and its tokenizer) to post-train, loaded with
    local_files_only; None: a randomly initialised decoder of the preset's shape."""
    vit: str = "tiny"
    """Understanding encoder: 'tiny' (a randomly initialised SigLIP vision tower of the
    shape below) or the path of a local SigLIP checkpoint. Always frozen."""
    hidden_size: int = 64
    """Decoder width (ignored with --llm)."""
    num_layers: int = 2
    """Decoder layers (ignored with --llm)."""
    num_heads: int = 4
    """Query heads (ignored with --llm)."""
    num_kv_heads: int = 2
    """Key / value heads: num_heads must be a multiple (ignored with --llm)."""
    head_dim: int = 16
    """Width of one attention head (ignored with --llm)."""
    intermediate_size: int = 256
    """Width of the decoder's MLP (ignored with --llm)."""
    vocab_size: int = 0
    """Text vocabulary of the decoder; 0: the tokenizer's own size (the Qwen2.5 presets use
    Qwen's 151,936 so that the LM head costs what it costs in a real model). Ignored with
    --llm (the checkpoint's embeddings set it)."""
    rope_theta: float = 10000.0
    """RoPE base of the decoder (ignored with --llm)."""
    vit_hidden_size: int = 32
    """Width of the 'tiny' ViT."""
    vit_layers: int = 1
    """Layers of the 'tiny' ViT."""
    vit_heads: int = 2
    """Heads of the 'tiny' ViT."""
    vit_patch: int = 4
    """Patch size of the 'tiny' ViT: (image_size / vit_patch)^2 condition tokens."""
    image_size: int = 32
    """Side of the synthetic images in pixels (condition and targets)."""
    patch: int = 4
    """Patch side of the generation tokens: (image_size / patch)^2 target tokens per image."""
    latent_channels: int = 16
    """Channels of a continuous latent token (mar, flow): patch*patch*3 pixels projected by a
    fixed orthonormal matrix, standing in for a VAE."""
    num_codes: int = 64
    """Codebook size of the discrete image tokens (ar): k-means over image patches."""
    image_tokenizer: Optional[str] = None
    """A local image tokenizer instead of the built-in one: for ar a codebook file (a .pt
    holding KMeansCodebook.state_dict(), e.g. the 'image_tokenizer' of an earlier run's
    checkpoint.pt); for mar / flow the directory of a diffusers AutoencoderKL (needs
    `pip install diffusers`; its downsampling factor must equal --patch and its latent
    channels --latent-channels). None: k-means codes (ar) or patch latents (mar, flow)."""
    diffusion_layers: int = 2
    """Residual blocks of mar's per-token MLP diffusion head."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (less memory)."""
    tie_word_embeddings: Optional[bool] = None
    """The LM head IS the input embedding matrix (one Parameter, trained by both uses), as
    in Qwen2.5-0.5B / 1.5B (Harmon's backbone); untied, the head is a separate vocab x
    hidden matrix with its own AdamW state. Default: tied for the Qwen2.5 presets, untied
    for tiny. With --llm the checkpoint's own setting wins over the preset's; only this
    flag (or a --config file) overrides it: untying a tied checkpoint starts the head as a
    copy of its embeddings, tying an untied one is refused unless its head equals its
    embeddings. Tied, the shared matrix counts as an embedding: no weight decay."""

    def __post_init__(self):
        _check_field_types(self)
        _one_of("family", self.family, FAMILIES)
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vit_hidden_size", "vit_layers", "vit_heads",
                     "vit_patch", "image_size", "patch", "latent_channels", "diffusion_layers"):
            _at_least(name, getattr(self, name), 1)
        _at_least("vocab_size", self.vocab_size, 0)
        _at_least("num_codes", self.num_codes, 2)
        _at_least("rope_theta", self.rope_theta, 1.0, float)
        if self.llm is None and self.head_dim % 2:
            raise ConfigError("--head-dim", f"must be even (rotary embedding rotates pairs of "
                                            f"channels), got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("--num-heads", f"must be a multiple of --num-kv-heads "
                                             f"({self.num_kv_heads}), got {self.num_heads}")
        if self.vit_hidden_size % self.vit_heads:
            raise ConfigError("--vit-hidden-size", f"must be a multiple of --vit-heads "
                                                   f"({self.vit_heads}), got {self.vit_hidden_size}")
        for name in ("patch", "vit_patch"):
            if self.image_size % getattr(self, name):
                raise ConfigError(flag_of(name), f"must divide --image-size "
                                                 f"({self.image_size}), got {getattr(self, name)}")
        if self.image_size < 16:
            raise ConfigError("--image-size", f"must be >= 16 (the scene renderer's minimum), "
                                              f"got {self.image_size}")
        if self.latent_channels > 3 * self.patch ** 2:
            raise ConfigError("--latent-channels", f"must be <= patch*patch*3 = "
                                                   f"{3 * self.patch ** 2}, got {self.latent_channels}")
        if self.llm is not None and not os.path.isdir(self.llm):
            raise ConfigError("--llm", f"no such directory {self.llm!r} (a local Qwen2 "
                                       f"checkpoint saved with save_pretrained)")
        if self.image_tokenizer is not None:
            want_dir = self.family != "ar"
            found = (os.path.isdir if want_dir else os.path.isfile)(self.image_tokenizer)
            if not found:
                what = ("the directory of a diffusers AutoencoderKL" if want_dir
                        else "a codebook .pt file")
                raise ConfigError("--image-tokenizer", f"for --family {self.family} this must be "
                                                       f"{what}; not found: {self.image_tokenizer!r}")
        if self.tie_word_embeddings is None:   # not set: the checkpoint's own, else untied
            self.tie_word_embeddings = (checkpoint_ties(self.llm) if self.llm is not None
                                        else False)
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError("--tie-word-embeddings", f"must be true or false, got "
                                                       f"{self.tie_word_embeddings!r}")
        if self.vit != "tiny" and not os.path.isdir(self.vit):
            raise ConfigError("--vit", f"must be 'tiny' or the directory of a local SigLIP "
                                       f"checkpoint; no such directory {self.vit!r}")

    @property
    def target_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


def checkpoint_ties(path: str) -> bool:
    """tie_word_embeddings of the local checkpoint at `path` (its config.json; a missing
    key is Qwen2Config's default, untied). An unreadable config gives False here: loading
    the model reports it, naming --llm."""
    try:
        with open(os.path.join(path, "config.json")) as fh:
            values = json.load(fh)
    except (OSError, ValueError):
        return False
    return bool(values.get("tie_word_embeddings", False)) if isinstance(values, dict) else False


@dataclasses.dataclass
class DataConfig:
    """What the model trains on: recipe, tasks, packing, held-out evaluation."""

    recipe: str = "unimrg"
    """unimrg: und + pixel + depth + seg, lambda 1 each, white-on-black boundary targets;
    sgt: seg + und at 2:1 samples, coloured instance targets; sft: understanding only (the
    paper's baseline)."""
    tasks: Optional[Tuple[str, ...]] = None
    """Comma-separated subset of und,pixel,depth,seg that replaces the recipe's tasks (one
    sample of each in turn, lambda 1); the recipe still picks the segmentation style."""
    schedule: str = "interleaved"
    """interleaved: samples of different tasks packed together (one PackedLayout per pack);
    round-robin: the released code's single-task micro-batches und -> depth -> pixel -> seg,
    gradients accumulated over one of each."""
    pack_tokens: int = 1024
    """Most tokens in one pack (each pack is padded to exactly this)."""
    packs_per_step: int = 1
    """Packs per optimizer step in the interleaved schedule (gradient accumulation)."""
    questions_per_image: int = 1
    """Question-answer turns in one und sample (a multi-turn conversation about the image,
    as in LLaVA-style data): more answer tokens per image token."""
    seg_style: str = "auto"
    """Segmentation target: edges (UniMRG: white boundaries on black), colour (SGT:
    instances filled with distinct colours); auto: colour for sgt, edges otherwise."""
    seed: int = 0
    """Seed of the training scenes, masks, noise and initialisation; held-out scenes use
    seeds disjoint from every training seed."""
    eval_questions: int = 16
    """Held-out questions for understanding accuracy (greedy decoding), before and after."""
    eval_scenes: int = 4
    """Held-out scenes whose generation samples give the held-out per-task losses."""
    data: Optional[str] = None
    """Real data: a LLaVA-format .json / .jsonl file of records (or the folder holding
    one); needs --llm (its tokenizer). None: the embedded synthetic scenes."""
    images: Optional[str] = None
    """Folder of the records' relative image paths (default: tuning_data next to the
    records, the UniMRG release's layout)."""
    depth_dir: Optional[str] = None
    """Depth targets, .png at the images' relative paths (default: <images>_depth; make it
    with python -m trainer.prepare)."""
    mask_dir: Optional[str] = None
    """Segmentation targets, .png at the images' relative paths (default: <images>_mask)."""
    num_workers: int = 0
    """DataLoader worker processes that read and preprocess real data; 0: in the trainer."""
    shuffle: bool = True
    """Real data: visit the records in a fresh permutation every epoch, drawn from --seed
    (--no-shuffle: file order; LLaVA-style files are often grouped by source)."""

    def __post_init__(self):
        _check_field_types(self)
        _one_of("recipe", self.recipe, RECIPES)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("seg_style", self.seg_style, SEG_STYLES)
        if self.tasks is not None:
            if isinstance(self.tasks, str):
                self.tasks = tuple(t.strip() for t in self.tasks.split(",") if t.strip())
            if not isinstance(self.tasks, (list, tuple)):
                raise ConfigError("--tasks", f"must be a comma-separated list of tasks "
                                             f"({', '.join(TASKS)}), got {self.tasks!r}")
            self.tasks = tuple(self.tasks)
            if not self.tasks:
                raise ConfigError("--tasks", f"must name at least one task; allowed values: "
                                             f"{', '.join(TASKS)}")
            for task in self.tasks:
                if task not in TASKS:
                    raise ConfigError("--tasks", f"unknown task {task!r}; allowed values: "
                                                 f"{', '.join(TASKS)} (comma-separated)")
            if len(set(self.tasks)) != len(self.tasks):
                raise ConfigError("--tasks", f"names a task twice: {','.join(self.tasks)}")
        _at_least("pack_tokens", self.pack_tokens, 16)
        _at_least("packs_per_step", self.packs_per_step, 1)
        _at_least("questions_per_image", self.questions_per_image, 1)
        _in_range("seed", self.seed, 0, 100_000)
        _at_least("eval_questions", self.eval_questions, 0)
        _at_least("eval_scenes", self.eval_scenes, 0)
        _at_least("num_workers", self.num_workers, 0)
        if self.data is None:   # settings of real data alone would be silently ignored
            for name in ("images", "depth_dir", "mask_dir"):
                if getattr(self, name) is not None:
                    raise ConfigError(flag_of(name), "only used with --data (real data); the "
                                                     "synthetic scenes have no folders")
            if self.num_workers:
                raise ConfigError("--num-workers", "only used with --data (real data); the "
                                                   "synthetic scenes are made in the trainer")
        elif self.questions_per_image != 1:
            raise ConfigError("--questions-per-image", "only used by the synthetic scenes; "
                                                       "real data's conversations have their "
                                                       "own turns")
        if self.data is not None:   # missing folders fail here, before any work starts
            from trainer.datapaths import DataPathError, resolve

            try:
                resolve(self.data, self.images, self.depth_dir, self.mask_dir, self.active_tasks,
                        seg_colour=self.seg_colour)
            except DataPathError as exc:
                raise ConfigError(exc.flag, exc.message) from None

    @property
    def task_cycle(self) -> Tuple[str, ...]:
        """The tasks of consecutive samples, repeated (the recipe's mix)."""
        return self.tasks if self.tasks is not None else RECIPE_CYCLES[self.recipe]

    @property
    def active_tasks(self) -> Tuple[str, ...]:
        return tuple(t for t in TASKS if t in self.task_cycle)

    @property
    def seg_colour(self) -> bool:
        return self.seg_style == "colour" or (self.seg_style == "auto" and self.recipe == "sgt")


@dataclasses.dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to 0 (the UniMRG release's defaults)."""

    steps: int = 10_000
    """Optimizer steps."""
    lr: float = 1e-5
    """Peak learning rate (UniMRG: 1e-5; the tiny preset sets 3e-3 so that a randomly
    initialised model shows learning within a CPU minute)."""
    betas: Tuple[float, float] = (0.9, 0.95)
    """AdamW betas, comma-separated."""
    weight_decay: float = 0.02
    """AdamW decoupled weight decay (matrices only; norms, biases and embeddings get none,
    a tied LM head too: it is the embeddings)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    warmup: float = 0.01
    """Fraction of the steps spent in the linear warm-up (the rest is cosine to 0)."""

    def __post_init__(self):
        _check_field_types(self)
        _at_least("steps", self.steps, 1)
        _at_least("lr", self.lr, 0.0, float)
        if not self.lr > 0:
            raise ConfigError("--lr", f"must be > 0, got {self.lr!r}")
        if isinstance(self.betas, str):
            try:
                self.betas = tuple(float(b) for b in self.betas.split(","))
            except ValueError:
                raise ConfigError("--betas", f"must be two numbers in [0, 1), e.g. 0.9,0.95; "
                                             f"got {self.betas!r}") from None
        if not isinstance(self.betas, (list, tuple)):
            raise ConfigError("--betas", f"must be two numbers in [0, 1), e.g. 0.9,0.95; "
                                         f"got {self.betas!r}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                           and 0 <= b < 1 for b in self.betas):
            raise ConfigError("--betas", f"must be two numbers in [0, 1), e.g. 0.9,0.95; "
                                         f"got {self.betas!r}")
        _at_least("weight_decay", self.weight_decay, 0.0, float)
        _at_least("grad_clip", self.grad_clip, 0.0, float)
        _in_range("warmup", self.warmup, 0.0, 1.0, high_open=True)


@dataclasses.dataclass
class RunConfig:
    """Where and how the run executes, and what it writes."""

    fast_kernels: bool = False
    """Fused Triton kernels (impl='triton') for attention, the losses and the decoder's
    RMSNorm / SwiGLU / rotary embedding (unimrg_fast.hf); without a CUDA device
    they run on the Triton interpreter (exact, slow). Off: the plain PyTorch reference."""
    fused_decoder: bool = True
    """With --fast-kernels, also swap the decoder's RMSNorm / SwiGLU / rotary embedding for
    the fused kernels; --no-fused-decoder keeps the model's own (eager PyTorch) ones while
    attention and the losses stay fused. No effect without --fast-kernels."""
    out: str = "runs"
    """Parent directory of the run directory (a timestamped subfolder is created in it)."""
    name: Optional[str] = None
    """Name of the run directory inside --out (default: timestamp-recipe-family)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu or cuda."""
    precision: str = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU; or force fp32 / bf16."""
    log_every: int = 10
    """Steps between log lines (the only steps that synchronise with the device)."""
    checkpoint_every: int = 0
    """Steps between intermediate checkpoints; 0: only the final one."""
    progress: bool = True
    """Show the tqdm progress bar."""
    cpu_threads: int = 0
    """Intra-op threads of torch on a CPU; 0: torch's default. The tiny preset uses 1: its
    matrices are too small to gain from more, and on a shared CPU extra threads spin
    waiting for one another (100x slower steps were measured on a busy 2-core machine)."""
    resume: Optional[str] = None
    """Continue a run from a checkpoint: the path of a checkpoints/step-N directory or of a
    run directory (its latest complete checkpoint), or 'auto' (the latest complete one in
    --resume-dir). The run continues in the checkpoint's run directory with the identical
    loss curve; settings that shape the model, data or optimizer must match."""
    resume_dir: Optional[str] = None
    """Run directory that --resume auto searches for its latest complete checkpoint (only
    used with --resume auto)."""
    keep_checkpoints: int = 2
    """Resumable checkpoints (checkpoints/step-N) kept in the run directory: the last K."""
    max_skipped_steps: int = 10
    """A step whose loss or global gradient norm is not finite is skipped (no weight update,
    AdamW state unchanged) and counted (skipped_steps in the metrics); the run stops
    (naming the step) once more than this many CONSECUTIVE steps were skipped, checked at
    log steps. 0: the first non-finite step stops the run."""
    telemetry_every: int = 0
    """Steps between telemetry in the metrics (GPU memory, utilisation, power, clock,
    temperature, MFU; nothing on a CPU); 0: every log step."""
    tensorboard: bool = True
    """Also write the metrics as TensorBoard scalars (into the run directory) when
    torch.utils.tensorboard can be imported; quietly off otherwise."""
    parallel: Optional[str] = None
    """Scale-out under torchrun (trainer/distributed.py): ddp (data-parallel) or fsdp
    (FSDP2, decoder layers sharded); None: ddp when WORLD_SIZE > 1, else one process.
    Per-task losses are normalised by the counts of the global step."""

    def __post_init__(self):
        _check_field_types(self)
        _one_of("device", self.device, DEVICES)
        _one_of("precision", self.precision, PRECISIONS)
        _at_least("log_every", self.log_every, 1)
        _at_least("checkpoint_every", self.checkpoint_every, 0)
        _at_least("cpu_threads", self.cpu_threads, 0)
        _at_least("keep_checkpoints", self.keep_checkpoints, 1)
        _at_least("telemetry_every", self.telemetry_every, 0)
        _at_least("max_skipped_steps", self.max_skipped_steps, 0)
        if self.parallel is not None:
            _one_of("parallel", self.parallel, PARALLEL)
        if self.resume is not None and self.resume != "auto" and not os.path.exists(self.resume):
            raise ConfigError("--resume", f"no such checkpoint {self.resume!r} (a "
                                          f"checkpoints/step-N directory, a run directory or auto)")
        if self.resume == "auto" and not self.resume_dir:
            raise ConfigError("--resume", "auto needs --resume-dir RUN_DIR")
        if self.resume_dir is not None and self.resume != "auto":
            given = (f"not with --resume {self.resume!r}" if self.resume is not None
                     else "and --resume was not given")
            raise ConfigError("--resume-dir", f"only used with --resume auto, {given}; pass "
                                              f"--resume auto, or drop --resume-dir")
        if self.resume_dir is not None and not os.path.isdir(self.resume_dir):
            raise ConfigError("--resume-dir", f"no such directory {self.resume_dir!r}")
        blocker = _not_a_directory(self.out)
        if blocker is not None:
            raise ConfigError("--out", f"must be a directory (or a path where one can be "
                                       f"created); {blocker!r} exists and is not a directory")
        if self.name is not None and (not self.name or os.sep in self.name or self.name in (".", "..")):
            raise ConfigError("--name", f"must be a plain folder name, got {self.name!r}")


def without_effect(data: Dict[str, Any]) -> Tuple[str, ...]:
    """The data settings that have no effect on a run with these data settings (refused
    when given now; an older run's stored config may still hold them): real data's for
    the synthetic scenes, the scenes' questions per image for real data."""
    if data.get("data") is None:
        return ("images", "depth_dir", "mask_dir", "num_workers", "shuffle")
    return ("questions_per_image",)


def _not_a_directory(path: str) -> Optional[str]:
    """The existing non-directory at `path` or at the nearest of its parents that exists
    (where no directory can be made), else None."""
    here = os.path.abspath(path)
    while not os.path.lexists(here):
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent
    return None if os.path.isdir(here) else here


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "run": RunConfig}
# Settings that name files the run reads ('tiny' is --vit's built-in model, not a path):
# a resume compares them as typed or by the place they name (checkpoint._same).
PATH_FIELDS = ("llm", "vit", "image_tokenizer", "data", "images", "depth_dir", "mask_dir")
# Run settings that name this machine's paths and devices: a stored config (a checkpoint's)
# is loaded without checking them again (its --resume checkpoint may have been pruned since).
ENVIRONMENT = ("resume", "resume_dir", "out", "device")


@dataclasses.dataclass
class Config:
    """One post-training run."""

    preset: str = "tiny"
    """Preset the run starts from: tiny (a 2-core CPU), qwen2.5-0.5b, qwen2.5-1.5b."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self):
        _one_of("preset", self.preset, tuple(PRESETS))
        longest = self.longest_sample_tokens()
        if self.data.pack_tokens < longest:
            raise ConfigError("--pack-tokens", f"{self.data.pack_tokens} is smaller than the "
                                               f"longest sample ({longest} tokens); use "
                                               f"--pack-tokens >= {longest}")
        if self.data.data is not None and self.model.llm is None:
            raise ConfigError("--data", "real data needs a real tokenizer: pass --llm PATH (a "
                                        "local Qwen2 checkpoint with its tokenizer)")
        if self.run.device == "cuda":
            import torch  # only here: the rest of this module must not need torch

            if not torch.cuda.is_available():
                raise ConfigError("--device", "cuda was asked for but torch sees no CUDA "
                                              "device; allowed values: auto, cpu")

    def longest_sample_tokens(self, condition_tokens: Optional[int] = None) -> int:
        """Tokens of the longest sample: condition image + longest text + target image."""
        m = self.model
        cond = condition_tokens if condition_tokens is not None else (m.image_size // m.vit_patch) ** 2
        # bos + per turn the longest question and answer of the synthetic language + eos
        text = 1 + 15 * self.data.questions_per_image
        gen = any(t in GEN_TASKS for t in self.data.task_cycle)
        return cond + text + (m.target_tokens if gen else 0)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(values: Dict[str, Any]) -> "Config":
        """Inverse of to_dict (a checkpoint's config). The run's paths and device
        (ENVIRONMENT: --resume, --resume-dir, --out, --device) are restored as stored, not
        checked again: they described the machine and the moment of that run."""
        run = dict(values.get("run", {}))
        stored = {key: run.pop(key) for key in ENVIRONMENT if key in run}
        data = dict(values.get("data", {}))
        for key in without_effect(data):   # an older run's ignored values (refused now)
            data.pop(key, None)            # back to their defaults
        sections = {name: cls(**(run if name == "run" else data if name == "data"
                                 else values.get(name, {})))
                    for name, cls in SECTIONS.items()}
        config = Config(preset=values.get("preset", "tiny"), **sections)
        for key, value in stored.items():
            setattr(config.run, key, value)
        return config


# ------------------------------------------------------------------------------- presets
def tiny() -> Config:
    """A model a 2-core CPU trains in a minute or two: 2 layers of width 64, 4 q / 2 kv heads
    of 16, 32x32 images (64 condition + 64 target tokens), packs of 1,024 tokens, 30 steps;
    lr 3e-3 with 5% warm-up (random init on a toy language needs far more than the UniMRG
    fine-tuning rate of 1e-5, and 1% of 30 steps would be no warm-up at all); one torch
    thread."""
    return Config(preset="tiny", model=ModelConfig(),
                  data=DataConfig(pack_tokens=1024, eval_questions=16, eval_scenes=4),
                  optim=OptimConfig(steps=30, lr=3e-3, warmup=0.05),
                  run=RunConfig(log_every=2, cpu_threads=1))


def _qwen(preset: str, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
          intermediate: int) -> Config:
    # Qwen2.5 shapes with Qwen's vocabulary, 128-px scenes (1,024 tokens per image, the
    # size of Harmon's latents) and a SigLIP-base-sized ViT; 16k-token packs.
    # Both Qwen2.5 models tie their LM head to the input embeddings.
    model = ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads,
                        num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate,
                        vocab_size=151_936, rope_theta=1_000_000.0, vit_hidden_size=768,
                        vit_layers=12, vit_heads=12, vit_patch=4, image_size=128, patch=4,
                        num_codes=8192, diffusion_layers=3, tie_word_embeddings=True)
    return Config(preset=preset, model=model,
                  data=DataConfig(pack_tokens=16_384, eval_questions=64, eval_scenes=16),
                  optim=OptimConfig(), run=RunConfig())


def qwen2_5_0_5b() -> Config:
    """Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 q / 2 kv heads), random init."""
    return _qwen("qwen2.5-0.5b", 896, 24, 14, 2, 64, 4864)


def qwen2_5_1_5b() -> Config:
    """Qwen2.5-1.5B's shape (hidden 1536, 28 layers, 12 q / 2 kv heads), random init."""
    return _qwen("qwen2.5-1.5b", 1536, 28, 12, 2, 128, 8960)


PRESETS = {"tiny": tiny, "qwen2.5-0.5b": qwen2_5_0_5b, "qwen2.5-1.5b": qwen2_5_1_5b}


# ---------------------------------------------------------------------------- overrides
def section_of(field_name: str) -> str:
    for section, cls in SECTIONS.items():
        if field_name in {f.name for f in dataclasses.fields(cls)}:
            return section
    raise KeyError(field_name)


def all_fields():
    """(section, dataclasses.Field) of every overridable field, in --help order."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield section, f


def build_config(preset: str = "tiny", overrides: Optional[Dict[str, Any]] = None) -> Config:
    """The preset's config with `overrides` applied and everything validated.

    `overrides` maps field names (flat, e.g. {"lr": 1e-3}) or sections ({"optim": {...}})
    to values; an unknown key is a ConfigError naming the allowed keys. With --llm, the
    tying of the LM head is the checkpoint's unless `overrides` names tie_word_embeddings.
    """
    _one_of("preset", preset, tuple(PRESETS))
    base = PRESETS[preset]()
    values = {name: dataclasses.asdict(getattr(base, name)) for name in SECTIONS}
    flat = flatten_overrides(overrides or {})
    for key, value in flat.items():
        values[section_of(key)][key] = value
    if values["model"]["llm"] is not None and "tie_word_embeddings" not in flat:
        # the preset's tying describes its own random-init shape; a checkpoint has its own
        values["model"]["tie_word_embeddings"] = None
    try:
        sections = {name: cls(**values[name]) for name, cls in SECTIONS.items()}
    except TypeError as exc:  # a value of the wrong type deep in a comparison
        raise ConfigError("--config", str(exc)) from None
    return Config(preset=preset, **sections)


def flatten_overrides(overrides: Dict[str, Any]) -> Dict[str, Any]:
    return _flatten(overrides, top=True)


def _flatten(overrides: Dict[str, Any], top: bool) -> Dict[str, Any]:
    known = {f.name for _, f in all_fields()}
    flat: Dict[str, Any] = {}

    def put(name: str, value: Any) -> None:
        if name in flat:   # grad_clip and grad-clip, or a flat key and its section's
            raise ConfigError(flag_of(name), f"set twice ({flat[name]!r} and {value!r}); "
                                             f"keep one")
        flat[name] = value

    for key, value in overrides.items():
        name = str(key).replace("-", "_")
        if name in SECTIONS and isinstance(value, dict):
            for inner, inner_value in _flatten(value, top=False).items():
                put(inner, inner_value)
        elif name in known:
            put(name, value)
        elif name == "preset":
            if not top:
                raise ConfigError("--preset", "belongs at the top level of --config (or on "
                                              "the command line), not inside a section")
            continue
        else:
            raise ConfigError(flag_of(name), f"unknown setting {key!r}; known settings: "
                                             f"preset, {', '.join(sorted(known))}")
    return flat


def load_file(path: str) -> Dict[str, Any]:
    """A YAML (.yaml / .yml) or TOML (.toml) file of settings, flat or by section."""
    if not os.path.isfile(path):
        raise ConfigError("--config", f"no such file {path!r}")
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        if path.endswith(".toml"):
            import tomllib

            values = tomllib.loads(raw.decode())
        else:
            values = yaml_load(raw) or {}
    except Exception as exc:
        raise ConfigError("--config", f"cannot parse {path!r}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError("--config", f"{path!r} must hold a mapping of settings, got "
                                      f"{type(values).__name__}")
    return values


# PyYAML follows YAML 1.1, where a float needs a dot: "1e-4" (the way learning rates are
# written) would load as text and be refused as not a number. YAML 1.2 reads it as a float.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


def yaml_load(raw: bytes) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):   # a subclass: safe_load's resolvers stay as they are
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT,
                                 list("-+0123456789"))
    return yaml.load(raw, Loader=Loader)


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> Dict[str, str]:
    """Each field's docstring (the string literal under it), for --help."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs
