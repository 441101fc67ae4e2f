"""Benchmark harness shared by every benchmark (DESIGN.md section 5).

    def test_bench_x(gpu_bench):
        gpu_bench(lambda: op(x), flops=2 * n * h * v, role="fused", group="linear-ce")

- each timed call ends with torch.cuda.synchronize(); the median of many rounds after
  warm-up is what pytest-benchmark reports;
- peak extra memory (max_memory_allocated after reset, minus what was allocated
  before: inputs excluded) and TFLOP/s of useful work go to extra_info;
- machine info gains GPU name / clocks / driver (nvidia-ml-py) and torch / triton
  versions;
- at the end a table prints every group side by side with ratios to its baseline
  (role="baseline"), which is how claims are made: ratios from one run;
- `--results-save NAME` writes the run's JSON to benchmarks/results/NAME.json.

GPU benchmarks skip with a reason on a CPU-only machine; host-time benchmarks (layout
metadata) run everywhere.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--results-save", default=None, metavar="NAME",
                     help="write this run's benchmark JSON to benchmarks/results/NAME.json")


def gpu_info() -> dict:
    """GPU name, clocks and driver from nvidia-ml-py; empty when there is no NVIDIA GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return {}
    try:
        if not HAS_CUDA:
            return {}
        from trainer.telemetry import nvml_handle

        handle = nvml_handle(pynvml, torch.cuda.current_device())
        if handle is None:
            return {"nvml_error": "the CUDA device has no matching NVML device"}
        clocks = pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_MEM
        name = pynvml.nvmlDeviceGetName(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {
            "gpu_name": name.decode() if isinstance(name, bytes) else name,
            "driver": driver.decode() if isinstance(driver, bytes) else driver,
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, clocks[0]),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, clocks[1]),
            "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, clocks[0]),
            "power_limit_w": pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000,
        }
    except Exception as exc:  # a partial NVML (containers) must not break a run
        return {"nvml_error": str(exc)}
    finally:
        pynvml.nvmlShutdown()


def software_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "cuda_runtime": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if HAS_CUDA:
        info["cuda_device"] = torch.cuda.get_device_name()
        info["cuda_capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["unimrg_fast"] = {**software_info(), **gpu_info()}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["unimrg_fast_saved_at"] = datetime.datetime.now().isoformat(timespec="seconds")


@pytest.fixture
def requires_cuda():
    if not HAS_CUDA:
        pytest.skip("GPU benchmark: needs a CUDA device (none visible to torch)")


def measure_peak_extra_memory(fn: Callable[[], object]) -> float:
    """Bytes allocated at the peak of one call beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return float(peak)


@pytest.fixture
def gpu_bench(benchmark, requires_cuda):
    """Times `fn` on the GPU: warm-up, synchronised rounds, memory and TFLOP/s.

    Args of the returned callable:
        fn: the work; its result is dropped after each call.
        flops: useful floating-point operations of one call (None: no TFLOP/s).
        role: "baseline" (the plain path), "fused", or "peer"; ratios are to the baseline.
        rounds / warmup: how many timed and untimed calls.
    """

    def run(fn: Callable[[], object], *, flops: Optional[float] = None, role: str = "fused",
            rounds: int = 20, warmup: int = 3, **extra):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        peak = measure_peak_extra_memory(fn)

        def timed():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(role=role, peak_extra_mem_gb=peak / 2 ** 30, **extra)
        if flops is not None:
            benchmark.extra_info["tflops"] = flops / median / 1e12
        return median

    return run


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benches = [b for b in getattr(session, "benchmarks", []) or [] if b.stats is not None]
    if not benches:
        return
    lines = _ratio_table(benches)
    if lines:
        terminalreporter.write_sep("=", "unimrg-fast: side-by-side ratios (median, this run)")
        for line in lines:
            terminalreporter.write_line(line)
    name = config.getoption("--results-save")
    if name:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{name}.json"
        rows = [{"group": b.group, "name": b.name, "median_s": b.stats.median,
                 "rounds": b.stats.rounds, **b.extra_info} for b in benches]
        path.write_text(json.dumps({"machine": {**software_info(), **gpu_info()},
                                    "saved_at": datetime.datetime.now().isoformat(timespec="seconds"),
                                    "benchmarks": rows}, indent=2))
        terminalreporter.write_line(f"results saved to {path}")


def _ratio_table(benches) -> list:
    groups = {}
    for bench in benches:
        groups.setdefault(bench.group or "-", []).append(bench)
    lines = []
    for group, members in sorted(groups.items()):
        baseline = next((b for b in members if b.extra_info.get("role") == "baseline"), None)
        lines.append(f"[{group}]")
        for b in sorted(members, key=lambda b: b.stats.median):
            ratio = f"{b.stats.median / baseline.stats.median:6.3f}x" if baseline else "    -  "
            tflops = b.extra_info.get("tflops")
            mem = b.extra_info.get("peak_extra_mem_gb")
            lines.append(f"  {b.name:60.60s} {b.stats.median * 1e3:10.3f} ms  {ratio} of baseline"
                         + (f"  {tflops:7.1f} TFLOP/s" if tflops is not None else "")
                         + (f"  {mem:8.3f} GB extra" if mem is not None else ""))
    return lines
