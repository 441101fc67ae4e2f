"""Telemetry added to the metrics rows every --telemetry-every steps, and TensorBoard.

GPU keys (only when the run is on a CUDA device; on a CPU none appear and nothing fails):

    gpu/mem_allocated_gib, gpu/mem_reserved_gib, gpu/mem_peak_gib    torch.cuda
    gpu/util_pct, gpu/power_w, gpu/sm_clock_mhz, gpu/temp_c          nvidia-ml-py (pynvml),
                                                                     when importable
    mfu                                                              when the GPU's peak is known

MFU (model FLOPs utilisation) = the model FLOPs of the steps since the last reading / their
wall time / (peak dense bf16 FLOP/s x GPUs). Model FLOPs count the useful matrix work of
each pack from its host-known shapes (FlopModel), forward + backward (x3) for trained
weights and forward only (x1) for the frozen ViT, 2 FLOPs per multiply-add:

    decoder layers   6 * (their matmul weights)                 per real token
    attention       12 * layers * q_heads * head_dim            per attended (query, key)
                                                                pair (DESIGN.md 3.4's rule,
                                                                exact from the spans)
    LM head          6 * vocab * hidden                         per answer row (tied to
                                                                the input embeddings or
                                                                not: the lookup is free)
    projector        6 * (its matmul weights)                   per condition token
    ViT (frozen)     2 * (its matmul weights)                   per ViT token
                     4 * vit_layers * vit_hidden * tokens/image per ViT token
    generation side  6 * (input-side weights)                   per target-image token
                     6 * (scored-side weights: diffusion MLP,   per scored target token
                          regression / image-token head)

Padding tokens, the input embedding (a lookup) and rematerialisation (gradient
checkpointing) are not counted: they are not model FLOPs. The first layer of a chain whose
input needs no gradient (projector, latent_in) is charged 6 rather than 4: an over-count
of well under 1% of a step at the Qwen presets.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch

# Dense bf16 peak FLOP/s (no sparsity: half the datasheets' sparse figures), by a
# substring of torch.cuda.get_device_name(), first match wins: the PCIe / NVL cards
# before the SXM figure their family name would otherwise give them.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12),
             ("H200", 989e12), ("H100", 989e12), ("A100", 312e12))


def peak_flops(device_name: Optional[str]) -> Optional[float]:
    """Peak dense bf16 FLOP/s of a GPU by name; None when unknown (then no MFU)."""
    if not device_name:
        return None
    for key, flops in PEAK_BF16:   # not followed by a digit: an RTX A1000 is no A100
        if re.search(re.escape(key) + r"(?![0-9])", device_name, re.IGNORECASE):
            return flops
    return None


def matmul_weights(module: torch.nn.Module) -> int:
    """Weights a token's vector is multiplied by in `module`: every nn.Linear / nn.Conv2d
    (a patch embedding is a linear map per patch) and unimrg_fast's heads. A FLOP count,
    not a parameter count: a matrix used twice (a tied LM head) counts at each use."""
    from unimrg_fast.heads import LMHead, RegressionHead

    kinds = (torch.nn.Linear, torch.nn.Conv2d, LMHead, RegressionHead)
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, kinds))


def mfu(flops: float, seconds: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs over `seconds` as a fraction of `peak` FLOP/s (None: unknown peak)."""
    if not peak or not seconds:
        return None
    return flops / seconds / peak


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """Model FLOPs of a training pack from its host-known shapes (see the module docstring);
    build it with from_model before the model is wrapped (FSDP shards the weights)."""

    decoder: float       # per real token
    attn_pair: float     # per attended (query, key) pair
    lm_head: float       # per answer row
    projector: float     # per condition (ViT) token
    vit_token: float     # per ViT token: weights and attention, forward only
    gen_input: float     # per target-image token
    gen_scored: float    # per scored target token

    @classmethod
    def from_model(cls, umm: torch.nn.Module) -> "FlopModel":
        cfg = umm.llm.config
        vit_cfg = umm.vit.config
        vit_tokens = (vit_cfg.image_size // vit_cfg.patch_size) ** 2
        gen_input, gen_scored = umm.gen.matmul_weights()
        return cls(decoder=6.0 * matmul_weights(umm.llm.layers),
                   attn_pair=12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * _head_dim(cfg),
                   lm_head=6.0 * umm.lm_head.weight.numel(),
                   projector=6.0 * matmul_weights(umm.projector),
                   vit_token=2.0 * matmul_weights(umm.vit)
                   + 4.0 * vit_cfg.num_hidden_layers * vit_cfg.hidden_size * vit_tokens,
                   gen_input=6.0 * gen_input, gen_scored=6.0 * gen_scored)

    def pack(self, pack) -> float:
        """Model FLOPs of one pack (forward + backward), without touching the device."""
        real = len(pack.sample_tasks)   # the samples before the padding sample
        return (self.decoder * pack.num_real_tokens
                + self.attn_pair * pack.layout.attended_pairs(real)
                + self.lm_head * pack.text_rows.shape[0]
                + (self.projector + self.vit_token) * pack.vit_rows.shape[0]
                + self.gen_input * pack.gen_rows.shape[0]
                + self.gen_scored * pack.scored.shape[0])

    def packs(self, packs: Iterable) -> float:
        return sum(self.pack(p) for p in packs)


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def nvml_handle(pynvml, cuda_index: int):
    """The NVML handle of torch's CUDA device `cuda_index`, found by the GPU's UUID: NVML
    numbers every GPU of the machine, CUDA only the visible ones (CUDA_VISIBLE_DEVICES) and
    possibly in another order. None when the GPU cannot be matched (no readings rather than
    another GPU's)."""
    uuid = getattr(torch.cuda.get_device_properties(cuda_index), "uuid", None)
    if uuid is not None:
        text = str(uuid)
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}")
        except Exception:
            pass
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.environ.get("CUDA_DEVICE_ORDER"):
        return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)   # same numbering
    return None


class NvmlReader:
    """nvidia-ml-py readings of one CUDA device. NVML is initialised once by open() and
    shut down by close(), so that a run (or a test) that builds telemetry many times does
    not leave NVML initialised."""

    PROBES = {
        "gpu/util_pct": lambda nv, h: nv.nvmlDeviceGetUtilizationRates(h).gpu,
        "gpu/power_w": lambda nv, h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
        "gpu/sm_clock_mhz": lambda nv, h: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
        "gpu/temp_c": lambda nv, h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
    }

    def __init__(self, pynvml, handle):
        self.pynvml, self.handle = pynvml, handle

    @classmethod
    def open(cls, cuda_index: int, pynvml=None) -> Optional["NvmlReader"]:
        """A reader for torch's CUDA device `cuda_index`, or None where nvidia-ml-py is
        missing, NVML does not start, or the GPU cannot be matched (then NVML is shut
        down again)."""
        try:
            if pynvml is None:
                import pynvml
            pynvml.nvmlInit()
        except Exception:
            return None
        try:
            handle = nvml_handle(pynvml, cuda_index)
        except Exception:
            handle = None
        reader = cls(pynvml, handle)
        if handle is None:
            reader.close()
            return None
        return reader

    def readings(self) -> Dict[str, float]:
        """Every probe the GPU and driver answer; one that fails is left out."""
        out: Dict[str, float] = {}
        if self.pynvml is None:
            return out
        for key, probe in self.PROBES.items():
            try:
                out[key] = float(probe(self.pynvml, self.handle))
            except Exception:
                pass
        return out

    def close(self) -> None:
        if self.pynvml is not None:
            try:
                self.pynvml.nvmlShutdown()
            except Exception:
                pass
            self.pynvml = None


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:   # tensorboard not installed: quietly off
        return None
    return SummaryWriter


class Telemetry:
    """Collects the attention context of each step's packs and, at telemetry steps, adds
    the GPU readings and MFU to a metrics row; mirrors rows to TensorBoard when on."""

    def __init__(self, config, model: torch.nn.Module, device: torch.device, run_dir: Path,
                 world: int = 1, enabled: bool = True):
        """world: processes of the run (MFU divides the global tokens/s by world GPUs);
        enabled=False (a rank > 0): due() still answers, but nothing is read or written."""
        self.every = config.run.telemetry_every or config.run.log_every
        self.world = world
        self.device = device
        self.cuda = enabled and device.type == "cuda" and torch.cuda.is_available()
        # only a UMM has the shapes MFU needs (tests pass stand-in modules)
        self.flop_model = FlopModel.from_model(model) if hasattr(model, "gen") else None
        self.peak = peak_flops(torch.cuda.get_device_name(device)) if self.cuda else None
        self.flops = 0.0
        self.since: Optional[float] = None   # when the first step since the last reading began
        self.nvml = NvmlReader.open(self._cuda_index()) if self.cuda else None
        self.writer = None
        if config.run.tensorboard and enabled:
            writer = _summary_writer()
            if writer is not None:
                self.writer = writer(log_dir=str(Path(run_dir) / "tensorboard"))

    def _cuda_index(self) -> int:
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def step_flops(self, packs) -> float:
        """Model FLOPs of this rank's packs of a step (0 without a UMM)."""
        return self.flop_model.packs(packs) if self.flop_model is not None else 0.0

    def add_flops(self, flops: float) -> None:
        """A step's model FLOPs over every rank, called as the step begins."""
        if self.since is None:
            self.since = time.perf_counter()
        self.flops += flops

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def readings(self) -> Dict[str, Any]:
        """GPU keys and MFU over the steps since the last reading (empty on a CPU); called
        at the end of a step, after the host has waited for the device (a log step)."""
        row: Dict[str, Any] = {}
        if self.cuda:
            gib = float(1 << 30)
            row["gpu/mem_allocated_gib"] = torch.cuda.memory_allocated(self.device) / gib
            row["gpu/mem_reserved_gib"] = torch.cuda.memory_reserved(self.device) / gib
            row["gpu/mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / gib
            if self.nvml is not None:
                row.update(self.nvml.readings())
            seconds = time.perf_counter() - self.since if self.since is not None else 0.0
            # the run's FLOPs over all of its GPUs; the readings above are this GPU's
            value = mfu(self.flops, seconds, self.peak * self.world if self.peak else None)
            if value is not None:
                row["mfu"] = value
                row["model_tflops_per_s"] = self.flops / seconds / 1e12
        self.flops, self.since = 0.0, None
        return row

    def scalars(self, row: Dict[str, Any], step: int) -> None:
        """Every numeric value of a metrics row as a TensorBoard scalar (when on)."""
        if self.writer is None:
            return
        prefix = "eval/" if row.get("event") == "eval" else "train/"
        for key, value in row.items():
            if key in ("step", "event") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                self.writer.add_scalar(prefix + key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.nvml is not None:
            self.nvml.close()
