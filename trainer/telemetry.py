"""Telemetry added to the metrics rows every --telemetry-every steps, and TensorBoard.

GPU keys (only when the run is on a CUDA device; on a CPU none appear and nothing fails):

    gpu/mem_allocated_gib, gpu/mem_reserved_gib, gpu/mem_peak_gib    torch.cuda
    gpu/util_pct, gpu/power_w, gpu/sm_clock_mhz, gpu/temp_c          nvidia-ml-py (pynvml),
                                                                     when importable
    mfu                                                              when the GPU's peak is known

MFU (model FLOPs utilisation) = model FLOPs per token x tokens/s / peak dense bf16 FLOP/s,
with model FLOPs per token (forward + backward, PaLM appendix B):

    6 * P  +  12 * layers * hidden * avg_context

P: every parameter on the LLM path, trainable and frozen (decoder, embeddings, LM head,
generation head; not the ViT, which runs forward only on condition images and is small);
avg_context: the keys each real token attends to on average, taken as sum(L_i^2) /
sum(L_i) over the samples of a pack (block-diagonal packs; each sample counted as fully
visible, an upper bound for its causal text spans). Rematerialisation (gradient
checkpointing) is not counted: it is hardware FLOPs, not model FLOPs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch

# Dense bf16 peak FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12))


def peak_flops(device_name: Optional[str]) -> Optional[float]:
    """Peak dense bf16 FLOP/s of a GPU by name; None when unknown (then no MFU)."""
    if not device_name:
        return None
    for key, flops in PEAK_BF16:
        if key.lower() in device_name.lower():
            return flops
    return None


def llm_path_params(model: torch.nn.Module) -> int:
    """Parameters on the LLM path (everything but the ViT), trainable and frozen."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vit."))


def flops_per_token(params: int, layers: int, hidden: int, avg_context: float) -> float:
    return 6.0 * params + 12.0 * layers * hidden * avg_context


def mfu(flops_token: float, tokens_per_s: float, peak: Optional[float]) -> Optional[float]:
    if not peak or tokens_per_s is None:
        return None
    return flops_token * tokens_per_s / peak


def pack_context(packs: Iterable) -> tuple:
    """(sum of L_i^2, sum of L_i) over the real samples of packs."""
    squares = total = 0
    for pack in packs:
        lengths = pack.layout.seqlens[:len(pack.sample_tasks)]
        squares += sum(n * n for n in lengths)
        total += sum(lengths)
    return squares, total


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
        llm_cfg = getattr(getattr(model, "llm", None), "config", None)
        self.layers = getattr(llm_cfg, "num_hidden_layers", config.model.num_layers)
        self.hidden = getattr(llm_cfg, "hidden_size", config.model.hidden_size)
        self.params = llm_path_params(model)
        self.peak = peak_flops(torch.cuda.get_device_name(device)) if self.cuda else None
        self.squares = self.total = 0
        self.nvml = self._nvml() if self.cuda else None
        self.writer = None
        if config.run.tensorboard and enabled:
            writer = _summary_writer()
            if writer is not None:
                self.writer = writer(log_dir=str(Path(run_dir) / "tensorboard"))

    def _nvml(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:
            return None

    def add_context(self, squares: float, total: float) -> None:
        """A step's attention context (pack_context over the packs of every rank)."""
        self.squares += squares
        self.total += total

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def flops_per_token(self) -> float:
        avg = self.squares / self.total if self.total else 0.0
        return flops_per_token(self.params, self.layers, self.hidden, avg)

    def readings(self, tokens_per_s: Optional[float]) -> Dict[str, Any]:
        """GPU keys and MFU (empty on a CPU); resets the context accumulated so far."""
        row: Dict[str, Any] = {}
        if self.cuda:
            gib = float(1 << 30)
            row["gpu/mem_allocated_gib"] = torch.cuda.memory_allocated(self.device) / gib
            row["gpu/mem_reserved_gib"] = torch.cuda.memory_reserved(self.device) / gib
            row["gpu/mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / gib
            row.update(self._nvml_readings())
            # the run's tokens/s over all of its GPUs; the readings above are this GPU's
            value = mfu(self.flops_per_token(), tokens_per_s,
                        self.peak * self.world if self.peak else None)
            if value is not None:
                row["mfu"] = value
                row["flops_per_token"] = self.flops_per_token()
        self.squares = self.total = 0
        return row

    def _nvml_readings(self) -> Dict[str, Any]:
        if self.nvml is None:
            return {}
        pynvml, handle = self.nvml
        out: Dict[str, Any] = {}
        probes = {
            "gpu/util_pct": lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "gpu/power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "gpu/sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "gpu/temp_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        }
        for key, probe in probes.items():
            try:
                out[key] = float(probe())
            except Exception:   # a reading this GPU / driver does not offer
                pass
        return out

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
