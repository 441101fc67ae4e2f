"""Scale-out (trainer/distributed.py) on a CPU: two processes over gloo give the same run as
one process with the same global batch, for DDP and FSDP2: per-step losses equal to 1e-5
and final trainable weights close. The runs are real `torchrun -m trainer` launches on the
small config of tests/trainer_helpers.py (3 steps); each is killed, with its workers, if it
outlives its timeout."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import distributed
from trainer.config import TASKS
from trainer.data import SampleFactory, TrainData
from trainer.model import build_model
from trainer_helpers import SMALL, small_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
TIMEOUT_S = 60


def _flags(out: Path, name: str, **overrides):
    values = {**SMALL, "steps": STEPS, "eval_questions": 2, "device": "cpu", "out": str(out),
              "name": name, **overrides}
    args = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, nproc: int) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if nproc == 1:
        cmd = [sys.executable, "-m", "trainer", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "trainer", *args]
    # own process group: a timeout kills torchrun and its workers together
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran past {TIMEOUT_S} s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-6000:]}"


def _result(run_dir: Path):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["event"] == "train"]
    return losses, torch.load(run_dir / "checkpoint.pt", map_location="cpu")["model"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, --parallel ddp (global-count normalisation), 2 packs."""
    out = tmp_path_factory.mktemp("dist")
    _launch(_flags(out, "one", packs_per_step=2, parallel="ddp"), 1)
    return _result(out / "one")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, one_process,
                                                                    parallel):
    _launch(_flags(tmp_path, "two", packs_per_step=1, parallel=parallel), 2)
    losses, weights = _result(tmp_path / "two")
    ref_losses, ref_weights = one_process
    assert len(losses) == len(ref_losses) == STEPS
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5)
    assert weights.keys() == ref_weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, ref_weights[name], rtol=1e-4, atol=1e-5, msg=name)


def _data(tmp_path, rank: int, world: int, **overrides):
    config = small_config(tmp_path, **overrides)
    model, text, images, cond = build_model(config)
    factory = SampleFactory(config, text, images, cond)
    ctx = distributed.Context(rank, world, torch.device("cpu"), "ddp")
    return config, model, factory, text, distributed.ShardedData(config, factory, text.pad_id, ctx)


def test_ranks_split_the_one_process_global_batch(tmp_path):
    config, model, factory, text, _ = _data(tmp_path, 0, 1, packs_per_step=4)
    single = TrainData(config, factory, text.pad_id)
    ranks = [_data(tmp_path, r, 2, packs_per_step=2)[-1] for r in range(2)]
    for _ in range(3):
        packs = single.step()
        sharded = [p for data in ranks for p in data.step()]
        assert len(sharded) == len(packs) == 4
        for a, b in zip(packs, sharded):
            assert a.sample_tasks == b.sample_tasks
            assert torch.equal(a.input_ids, b.input_ids)
            assert torch.equal(a.scored, b.scored)


def test_round_robin_gives_every_rank_one_pack_of_each_task(tmp_path):
    ranks = [_data(tmp_path, r, 2, schedule="round-robin")[-1] for r in range(2)]
    packs = [data.step() for data in ranks]
    for own in packs:
        assert [set(p.sample_tasks) for p in own] == [{0}, {2}, {1}, {3}]
    assert not torch.equal(packs[0][0].input_ids, packs[1][0].input_ids)


def test_host_weight_sums_equal_the_joint_loss_weight_sums(tmp_path):
    _, model, _, _, data = _data(tmp_path, 0, 1, packs_per_step=2)
    packs = data.step()
    expected = sum(model.loss(p, "reference").task_weight_sum.detach() for p in packs)
    assert torch.equal(distributed.weight_sums(packs), expected)
    assert distributed.weight_sums(packs).shape == (len(TASKS),)


def test_world_size_picks_ddp_by_default(tmp_path, monkeypatch):
    config = small_config(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.mode(config) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.mode(config) == "ddp"
    assert distributed.mode(small_config(tmp_path, parallel="fsdp")) == "fsdp"


@pytest.mark.parametrize("overrides", [dict(), dict(recipe="sft", family="ar")],
                         ids=["unimrg-mar", "sft-ar"])
def test_one_process_parallel_path_equals_the_plain_loop_with_one_pack(tmp_path, monkeypatch,
                                                                       overrides):
    """With one pack per step the global-count normalisation is the plain loop's; heads no
    pack used get no gradient (AdamW leaves them alone) in both."""
    from trainer.loop import train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common = dict(steps=STEPS, eval_questions=1, tensorboard=False, **overrides)
    plain = train(small_config(tmp_path, name="plain", **common))
    parallel = distributed.train(small_config(tmp_path, name="par", parallel="ddp", **common))
    (losses, weights), (ref_losses, ref_weights) = _result(parallel), _result(plain)
    assert losses == ref_losses
    for name, value in weights.items():
        assert torch.equal(value, ref_weights[name]), name
