"""The benchmark harness in benchmarks/conftest.py: ratio table and machine info."""
import importlib.util
import types
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "bench_conftest", Path(__file__).resolve().parents[1] / "benchmarks" / "conftest.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


def _bench(group, name, median, **extra):
    return types.SimpleNamespace(group=group, name=name, extra_info=extra,
                                 stats=types.SimpleNamespace(median=median))


def test_ratio_table_divides_by_the_groups_baseline():
    lines = harness._ratio_table([
        _bench("ce", "plain", 0.060, role="baseline", peak_extra_mem_gb=28.5),
        _bench("ce", "fused", 0.030, role="fused", tflops=300.0, peak_extra_mem_gb=0.5),
        _bench("attn", "only", 0.002),
    ])
    assert lines[0] == "[attn]" and "-" in lines[1]
    fused = next(line for line in lines if "fused" in line)
    plain = next(line for line in lines if "plain" in line)
    assert "0.500x" in fused and "300.0 TFLOP/s" in fused and "0.500 GB" in fused
    assert "1.000x" in plain
    # Rows are sorted fastest first within a group.
    assert lines.index(fused) < lines.index(plain)


def test_software_info_names_versions():
    info = harness.software_info()
    assert info["torch"] == torch.__version__ and "triton" in info


def test_gpu_info_is_empty_or_names_the_gpu():
    info = harness.gpu_info()
    if torch.cuda.is_available():
        assert "gpu_name" in info or "nvml_error" in info
    else:
        assert "gpu_name" not in info
