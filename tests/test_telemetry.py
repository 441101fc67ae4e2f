"""Telemetry (trainer/telemetry.py): nothing GPU-shaped on a CPU, the MFU formula, and the
TensorBoard mirror of the metrics when torch.utils.tensorboard is importable."""
import pytest

from trainer import telemetry
from trainer.loop import train
from trainer_helpers import small_config, train_rows


def test_cpu_run_has_no_gpu_keys_and_does_not_fail(tmp_path):
    rows = train_rows(train(small_config(tmp_path, steps=3, telemetry_every=1, family="ar")))
    assert len(rows) == 3
    for row in rows:
        assert not [k for k in row if k.startswith("gpu/") or k in ("mfu", "flops_per_token")]


def test_mfu_formula_with_a_fake_peak():
    # 6 * P + 12 * layers * hidden * context
    per_token = telemetry.flops_per_token(params=1_000, layers=2, hidden=8, avg_context=10)
    assert per_token == 6 * 1_000 + 12 * 2 * 8 * 10
    assert telemetry.mfu(per_token, tokens_per_s=100.0, peak=per_token * 400.0) == pytest.approx(0.25)
    assert telemetry.mfu(per_token, 100.0, None) is None


def test_peak_table_knows_hopper_and_ampere_only():
    assert telemetry.peak_flops("NVIDIA H200") == 989e12
    assert telemetry.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert telemetry.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert telemetry.peak_flops("NVIDIA GeForce RTX 3090") is None
    assert telemetry.peak_flops(None) is None


def test_pack_context_is_mean_attended_keys_of_real_samples(tmp_path):
    from trainer.data import SampleFactory, TrainData
    from trainer.model import build_model

    config = small_config(tmp_path)
    model, text, images, cond = build_model(config)
    packs = TrainData(config, SampleFactory(config, text, images, cond), text.pad_id).step()
    squares, total = telemetry.pack_context(packs)
    assert total == sum(p.num_real_tokens for p in packs)
    lengths = [n for p in packs for n in p.layout.seqlens[:len(p.sample_tasks)]]
    assert squares == sum(n * n for n in lengths)


class FakeWriter:
    instances = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_writer_gets_the_metrics_when_importable(tmp_path, monkeypatch):
    FakeWriter.instances = []
    monkeypatch.setattr(telemetry, "_summary_writer", lambda: FakeWriter)
    run_dir = train(small_config(tmp_path, steps=2, family="ar"))
    (writer,) = FakeWriter.instances
    assert writer.log_dir == str(run_dir / "tensorboard") and writer.closed
    tags = {(tag, step) for tag, _, step in writer.scalars}
    assert {("train/loss", 1), ("train/loss", 2), ("train/tokens_per_s", 2),
            ("eval/loss/depth", 0), ("eval/loss/depth", 2)} <= tags


def test_tensorboard_off_or_missing_is_quiet(tmp_path, monkeypatch):
    FakeWriter.instances = []
    monkeypatch.setattr(telemetry, "_summary_writer", lambda: FakeWriter)
    train(small_config(tmp_path / "off", steps=1, family="ar", tensorboard=False))
    assert FakeWriter.instances == []
    monkeypatch.setattr(telemetry, "_summary_writer", lambda: None)   # not installed
    train(small_config(tmp_path / "missing", steps=1, family="ar"))


def test_only_the_main_rank_writes_tensorboard(tmp_path, monkeypatch):
    import torch

    FakeWriter.instances = []
    monkeypatch.setattr(telemetry, "_summary_writer", lambda: FakeWriter)
    config = small_config(tmp_path)
    model = torch.nn.Linear(2, 2)
    other = telemetry.Telemetry(config, model, torch.device("cpu"), tmp_path, world=2,
                                enabled=False)
    assert other.writer is None and FakeWriter.instances == []
    assert other.due(config.run.log_every)   # still keeps the rank in step
    main_rank = telemetry.Telemetry(config, model, torch.device("cpu"), tmp_path, world=2)
    assert main_rank.writer is not None and len(FakeWriter.instances) == 1


@pytest.mark.parametrize("world", [1, 4])
def test_gpu_readings_with_a_fake_gpu_and_nvml(monkeypatch, world):
    """world: the run's tokens/s are spread over that many GPUs of the same peak."""
    import torch

    class FakeNvml:
        NVML_CLOCK_SM, NVML_TEMPERATURE_GPU = 1, 0

        @staticmethod
        def nvmlDeviceGetUtilizationRates(handle):
            return type("U", (), {"gpu": 87})()

        @staticmethod
        def nvmlDeviceGetPowerUsage(handle):
            return 612_000   # mW

        @staticmethod
        def nvmlDeviceGetClockInfo(handle, kind):
            return 1980

        @staticmethod
        def nvmlDeviceGetTemperature(handle, kind):
            raise RuntimeError("not supported")   # a reading the GPU lacks: left out

    for name, value in (("memory_allocated", 2 << 30), ("memory_reserved", 3 << 30),
                        ("max_memory_allocated", 4 << 30)):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, v=value: v)
    tel = telemetry.Telemetry.__new__(telemetry.Telemetry)
    tel.device, tel.cuda, tel.nvml = torch.device("cuda", 0), True, (FakeNvml, object())
    tel.params, tel.layers, tel.hidden, tel.peak, tel.world = 1_000, 2, 8, 1e6, world
    tel.squares, tel.total = 300, 30                     # mean context 10
    row = tel.readings(tokens_per_s=100.0)
    assert row["gpu/mem_allocated_gib"] == 2 and row["gpu/mem_reserved_gib"] == 3
    assert row["gpu/mem_peak_gib"] == 4
    assert row["gpu/util_pct"] == 87 and row["gpu/power_w"] == 612 and row["gpu/sm_clock_mhz"] == 1980
    assert "gpu/temp_c" not in row
    assert row["flops_per_token"] == 6 * 1_000 + 12 * 2 * 8 * 10
    assert row["mfu"] == pytest.approx(row["flops_per_token"] * 100.0 / (1e6 * world))
    assert tel.squares == tel.total == 0                 # the context restarts
