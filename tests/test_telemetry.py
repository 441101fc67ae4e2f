"""Telemetry (trainer/telemetry.py): nothing GPU-shaped on a CPU, the model-FLOP count
against torch's FLOP counter, MFU, NVML's device lookup, and the
TensorBoard mirror of the metrics when torch.utils.tensorboard is importable."""
import pytest

from trainer import telemetry
from trainer.loop import train
from trainer_helpers import small_config, train_rows


def test_cpu_run_has_no_gpu_keys_and_does_not_fail(tmp_path):
    rows = train_rows(train(small_config(tmp_path, steps=3, telemetry_every=1, family="ar")))
    assert len(rows) == 3
    for row in rows:
        assert not [k for k in row if k.startswith("gpu/") or k in ("mfu", "model_tflops_per_s")]


def test_mfu_is_model_flops_over_time_and_peak():
    assert telemetry.mfu(4e12, seconds=2.0, peak=8e12) == pytest.approx(0.25)
    assert telemetry.mfu(4e12, 2.0, None) is None
    assert telemetry.mfu(4e12, 0.0, 8e12) is None


def test_peak_table_knows_hopper_and_ampere_only():
    assert telemetry.peak_flops("NVIDIA H200") == 989e12
    assert telemetry.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert telemetry.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    # the PCIe / NVL cards are slower than the SXM part their family name matches
    assert telemetry.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert telemetry.peak_flops("NVIDIA H100 NVL") == 835e12
    assert telemetry.peak_flops("NVIDIA H200 NVL") == 835e12
    assert telemetry.peak_flops("NVIDIA GeForce RTX 3090") is None
    assert telemetry.peak_flops(None) is None
    # a name that contains a key followed by more digits is another card
    assert telemetry.peak_flops("NVIDIA RTX A1000 6GB Laptop GPU") is None
    assert telemetry.peak_flops("NVIDIA A100 80GB PCIe") == 312e12


def _no_flop_attention(q, k, v, layout, **_):
    """Stands in for packed_attention: every input gets a gradient, no matmul runs."""
    return (v + k * 0).repeat_interleave(q.shape[1] // k.shape[1], dim=1) + q * 0


@pytest.mark.parametrize("family", ["ar", "mar", "flow"])
def test_flop_model_matches_a_flop_counter_on_a_training_pack(tmp_path, monkeypatch, family):
    """FlopModel.pack against torch's FlopCounterMode over one pack's forward + backward.
    Attention is swapped for a FLOP-free stand-in (its pairs are checked against the
    dense mask below) and CPU SDPA (the ViT's attention) is not counted by FlopCounterMode,
    so both are left out; padding tokens do run through the decoder. The model charges the
    first layer of an input chain 6 FLOPs per weight where its input needs no gradient (4):
    a small over-count, at most 2% at these toy widths."""
    from torch.utils.flop_counter import FlopCounterMode

    import unimrg_fast as uf
    from trainer.data import SampleFactory, TrainData
    from trainer.model import build_model

    config = small_config(tmp_path, family=family, hidden_size=64, intermediate_size=128,
                          num_heads=4, num_kv_heads=2)
    model, text, images, cond = build_model(config)
    model.train()
    flops = telemetry.FlopModel.from_model(model)
    pack = TrainData(config, SampleFactory(config, text, images, cond), text.pad_id).step()[0]
    assert pack.scored.shape[0] > 0 and pack.num_real_tokens < pack.num_tokens
    monkeypatch.setattr(uf, "packed_attention", _no_flop_attention)
    with FlopCounterMode(display=False) as counter:
        model.loss(pack, "reference").total.backward()
    vit = model.vit.config
    vit_attention = 4 * vit.num_hidden_layers * vit.hidden_size * (vit.image_size // vit.patch_size) ** 2
    expected = (flops.pack(pack)
                - flops.attn_pair * pack.layout.attended_pairs(len(pack.sample_tasks))
                - vit_attention * pack.vit_rows.shape[0]
                + flops.decoder * (pack.num_tokens - pack.num_real_tokens))
    counted = counter.get_total_flops()
    assert counted <= expected <= 1.02 * counted, (family, counted, expected)


def test_attention_pairs_of_a_pack_follow_the_mask_of_its_real_samples(tmp_path):
    from trainer.data import SampleFactory, TrainData
    from trainer.model import build_model

    config = small_config(tmp_path, family="flow")
    model, text, images, cond = build_model(config)
    flops = telemetry.FlopModel.from_model(model)
    pack = TrainData(config, SampleFactory(config, text, images, cond), text.pad_id).step()[0]
    real = len(pack.sample_tasks)
    pairs = sum(int(pack.layout.sample_mask(s).sum()) for s in range(real))
    assert pack.layout.attended_pairs(real) == pairs
    assert pairs < sum(n * n for n in pack.layout.seqlens[:real])   # not every key is visible
    cfg = model.llm.config
    assert flops.attn_pair == 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim


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
    clock = iter([10.0, 12.0])   # the first step begins at 10 s, the reading is at 12 s
    monkeypatch.setattr(telemetry.time, "perf_counter", lambda: next(clock))
    tel = telemetry.Telemetry.__new__(telemetry.Telemetry)
    tel.device, tel.cuda = torch.device("cuda", 0), True
    tel.nvml = telemetry.NvmlReader(FakeNvml, object())
    tel.peak, tel.world, tel.flops, tel.since = 1e6, world, 0.0, None
    tel.add_flops(3e5)
    tel.add_flops(1e5)                                   # two steps: 4e5 FLOPs in 2 s
    row = tel.readings()
    assert row["gpu/mem_allocated_gib"] == 2 and row["gpu/mem_reserved_gib"] == 3
    assert row["gpu/mem_peak_gib"] == 4
    assert row["gpu/util_pct"] == 87 and row["gpu/power_w"] == 612 and row["gpu/sm_clock_mhz"] == 1980
    assert "gpu/temp_c" not in row
    assert row["mfu"] == pytest.approx(4e5 / 2.0 / (1e6 * world))
    assert row["model_tflops_per_s"] == pytest.approx(2e5 / 1e12)
    assert tel.flops == 0 and tel.since is None          # the next interval starts afresh


def test_nvml_handle_is_found_by_uuid_not_by_cuda_index(monkeypatch):
    """With CUDA_VISIBLE_DEVICES=4,5 torch's cuda:0 is the machine's 5th GPU: NVML's index 0
    would read another GPU, its UUID finds the right one."""
    import types

    import torch

    uuids = {0: "1111-aaaa", 1: "2222-bbbb"}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid=uuids[i]))

    class FakeNvml:
        @staticmethod
        def nvmlDeviceGetHandleByUUID(uuid):
            return {"GPU-1111-aaaa": "gpu4", "GPU-2222-bbbb": "gpu5"}[uuid]

        @staticmethod
        def nvmlDeviceGetHandleByIndex(index):
            return f"gpu{index}"

    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert telemetry.nvml_handle(FakeNvml, 0) == "gpu4"
    assert telemetry.nvml_handle(FakeNvml, 1) == "gpu5"
    uuids[0] = "9999-unknown"                  # NVML does not know it: no readings at all
    assert telemetry.nvml_handle(FakeNvml, 0) is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # every GPU visible: the numbering is NVML's
    assert telemetry.nvml_handle(FakeNvml, 0) == "gpu0"


class CountingNvml:
    """A pynvml stand-in that counts its init / shutdown calls."""

    NVML_CLOCK_SM, NVML_TEMPERATURE_GPU = 1, 0

    def __init__(self, fail_init=False):
        self.inits = self.shutdowns = 0
        self.fail_init = fail_init

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetClockInfo(self, handle, kind):
        return 1755


def test_nvml_is_shut_down_once_when_telemetry_closes(monkeypatch):
    nvml = CountingNvml()
    monkeypatch.setattr(telemetry, "nvml_handle", lambda pynvml, index: f"gpu{index}")
    reader = telemetry.NvmlReader.open(3, pynvml=nvml)
    assert reader is not None and reader.handle == "gpu3" and nvml.inits == 1
    # only the clock answers: the probes this fake lacks are left out, not raised
    assert reader.readings() == {"gpu/sm_clock_mhz": 1755.0}
    tel = telemetry.Telemetry.__new__(telemetry.Telemetry)
    tel.writer, tel.nvml = None, reader
    tel.close()
    tel.close()
    assert nvml.shutdowns == 1 and reader.readings() == {}


def test_nvml_that_cannot_match_the_gpu_is_shut_down_and_gives_no_reader(monkeypatch):
    nvml = CountingNvml()
    monkeypatch.setattr(telemetry, "nvml_handle", lambda pynvml, index: None)
    assert telemetry.NvmlReader.open(0, pynvml=nvml) is None
    assert (nvml.inits, nvml.shutdowns) == (1, 1)
    failing = CountingNvml(fail_init=True)
    assert telemetry.NvmlReader.open(0, pynvml=failing) is None
    assert failing.shutdowns == 0   # never started: nothing to shut down
