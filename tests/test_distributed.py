"""Scale-out (trainer/distributed.py) on a CPU: two processes over gloo give the same run as
one process with the same global batch, for DDP and FSDP2: per-step losses equal to 1e-5
and final trainable weights close. The runs are real `torchrun -m trainer` launches on the
small config of tests/trainer_helpers.py (3 steps); each is killed, with its workers, if it
outlives its timeout."""
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
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
TIMEOUT_S = 180   # ~12 s each when the machine is idle; the CI machine has 2 shared cores


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


def _descendants(pid: int) -> list:
    """Every process below `pid` (Linux /proc), found before anything is killed: torchrun
    starts its workers in sessions of their own, so killing its process group leaves them
    running, orphaned, holding the output pipe open (a test then hangs in communicate)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    doomed = _descendants(pid)
    for target in [pid] + doomed:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


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
        _kill_tree(proc.pid)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:   # a process we could not find holds the pipe
            output = "(no output: the pipe stayed open)"
        pytest.fail(f"{' '.join(cmd)} ran past {TIMEOUT_S} s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-6000:]}"


def _copy_to_resume(straight, resumed) -> None:
    """The uninterrupted run's directory, to resume from its checkpoints, less its final
    weights: a resume that wrote none would otherwise compare the run with itself."""
    shutil.copytree(straight, resumed)
    (resumed / "checkpoint.pt").unlink()


def _result(run_dir: Path):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["event"] == "train"]
    return losses, torch.load(run_dir / "checkpoint.pt", map_location="cpu")["model"]


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """The references: plain one-process runs (no --parallel), by packs per step, each
    made once."""
    runs = {}

    def run(packs: int):
        if packs not in runs:
            out = tmp_path_factory.mktemp(f"dist{packs}")
            _launch(_flags(out, "one", packs_per_step=packs), 1)
            runs[packs] = _result(out / "one")
        return runs[packs]

    return run


@pytest.fixture(scope="module")
def one_process(one_process_runs):
    """The one-process run of 2 packs per step."""
    return one_process_runs(2)


def _assert_same_run(result, reference) -> None:
    """Same losses and final weights, up to the float reassociation of a gradient
    all-reduce."""
    (losses, weights), (ref_losses, ref_weights) = result, reference
    assert len(losses) == len(ref_losses) == STEPS
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5)
    assert weights.keys() == ref_weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, ref_weights[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("per_rank", [1, 2])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, one_process_runs,
                                                                    parallel, per_rank):
    """per_rank 2: several micro-batches per rank, whose gradient sync DDP's no_sync() /
    FSDP2's set_requires_gradient_sync hold back until the last one."""
    _launch(_flags(tmp_path, "two", packs_per_step=per_rank, parallel=parallel), 2)
    _assert_same_run(_result(tmp_path / "two"), one_process_runs(2 * per_rank))


def test_fsdp_with_the_fused_kernels_tracks_the_plain_one_process_run(tmp_path, one_process):
    """--fast-kernels under FSDP2: every fused op (attention, losses, the decoder's norms /
    MLP / rotary swapped in by uf.hf) runs inside fully_shard's all-gathered layers. The
    plain and fused paths agree as tests/test_trainer.py's do (the first loss tightly,
    later ones within 1e-3: the updates differ by rounding)."""
    _launch(_flags(tmp_path, "fast", packs_per_step=1, parallel="fsdp", fast_kernels=True), 2)
    losses, weights = _result(tmp_path / "fast")
    ref_losses, ref_weights = one_process
    assert losses[0] == pytest.approx(ref_losses[0], rel=1e-5)
    assert losses == pytest.approx(ref_losses, rel=1e-3)
    assert weights.keys() == ref_weights.keys()


# --------------------------------------------------------- a tied LM head (Qwen2.5's tying)
TIED_STEPS = 4


@pytest.fixture(scope="module")
def tied_runs(tmp_path_factory):
    """--tie-word-embeddings runs of the same global batch, made once: one process (2 packs
    a step), and 2-process DDP and FSDP2 (1 pack a step each; FSDP checkpointed at step 2).
    The shared matrix lives in FSDP's root group as both llm.embed_tokens and lm_head."""
    out = tmp_path_factory.mktemp("tied")
    common = dict(steps=TIED_STEPS, tie_word_embeddings=True)
    _launch(_flags(out, "one", packs_per_step=2, **common), 1)
    _launch(_flags(out, "ddp", packs_per_step=1, parallel="ddp", **common), 2)
    _launch(_flags(out, "fsdp", packs_per_step=1, parallel="fsdp", checkpoint_every=2,
                   **common), 2)
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_tied_two_processes_match_one_process(tied_runs, parallel):
    losses, weights = _result(tied_runs / parallel)
    ref_losses, ref_weights = _result(tied_runs / "one")
    assert len(losses) == len(ref_losses) == TIED_STEPS
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5)
    assert weights.keys() == ref_weights.keys() and "lm_head.weight" in weights
    for name, value in weights.items():
        torch.testing.assert_close(value, ref_weights[name], rtol=1e-4, atol=1e-5, msg=name)
    for state in (weights, ref_weights):   # one matrix, trained by both uses
        assert torch.equal(state["lm_head.weight"], state["llm.embed_tokens.weight"])


def test_tied_fsdp_resume_continues_the_identical_run(tmp_path, tied_runs):
    straight = tied_runs / "fsdp"
    resumed = tmp_path / "resumed"
    _copy_to_resume(straight, resumed)
    _launch(_flags(tmp_path, "ignored", parallel="fsdp", steps=TIED_STEPS, checkpoint_every=2,
                   tie_word_embeddings=True,
                   resume=str(resumed / "checkpoints" / "step-00000002")), 2)
    (losses, weights), (ref_losses, ref_weights) = _result(resumed), _result(straight)
    assert len(losses) == TIED_STEPS and losses == ref_losses
    for name, value in weights.items():
        assert torch.equal(value, ref_weights[name]), name
    assert torch.equal(weights["lm_head.weight"], weights["llm.embed_tokens.weight"])


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


def test_step_objective_is_the_joint_loss_over_all_rows_of_the_step(tmp_path):
    """Two packs in one step: the accumulated gradient equals the gradient of
    sum_t lambda_t * (sum of task t's row losses) / (task t's rows in the step), computed
    here from both packs' loss sums at once, not each pack's own mean."""
    from trainer.loop import step_objective

    config, model, _, _, data = _data(tmp_path, 0, 1, packs_per_step=2)
    packs = data.step()
    counts = distributed.weight_sums(packs)
    lambdas = model.task_weights
    for pack in packs:
        out = model.loss(pack, "reference")
        step_objective(out, counts, lambdas, world=1).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    outs = [model.loss(pack, "reference") for pack in packs]
    sums = sum(o.task_loss_sum for o in outs)
    lam = torch.as_tensor(lambdas, dtype=torch.float32)
    expected = sum(lam[t] * sums[t] / counts[t] for t in range(len(TASKS)) if counts[t] > 0)
    expected.backward()
    assert fused.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in fused.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad,
                                   rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------ checkpoints under torchrun
RESUME_STEPS = 4


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """Uninterrupted 2-process runs checkpointed every 2 steps, one per mode, made once."""
    runs = {}

    def get(parallel: str) -> Path:
        if parallel not in runs:
            out = tmp_path_factory.mktemp(f"straight-{parallel}")
            _launch(_flags(out, "run", parallel=parallel, steps=RESUME_STEPS,
                           checkpoint_every=2), 2)
            runs[parallel] = out / "run"
        return runs[parallel]

    return get


@pytest.mark.parametrize("written, resumed_as", [("ddp", "ddp"), ("fsdp", "fsdp"), ("ddp", "fsdp")])
def test_two_process_resume_continues_the_identical_run(tmp_path, straight_runs, written,
                                                        resumed_as):
    """A 2-process run checkpointed at step 2 and resumed (2 processes) logs the losses of
    the uninterrupted run bit for bit and ends with the same weights; each rank's RNG state
    is in the checkpoint. DDP and FSDP2 write the same format: a DDP checkpoint resumes
    sharded (to float32 rounding: the reductions differ)."""
    straight = straight_runs(written)
    saved = straight / "checkpoints" / "step-00000002"
    for part in ("rng", "data"):   # each rank's RNG state and data position
        assert sorted(p.name for p in saved.iterdir() if p.name.startswith(f"{part}-")) == \
            [f"{part}-00000.pt", f"{part}-00001.pt"]
    assert torch.load(saved / "state.pt", weights_only=False)["world"] == 2
    resumed = tmp_path / "resumed"
    _copy_to_resume(straight, resumed)
    _launch(_flags(tmp_path, "ignored", parallel=resumed_as, steps=RESUME_STEPS,
                   checkpoint_every=2, resume=str(resumed / "checkpoints" / "step-00000002")), 2)
    assert not (tmp_path / "ignored").exists()   # the resumed run continues in its own directory
    (losses, weights), (ref_losses, ref_weights) = _result(resumed), _result(straight)
    assert len(losses) == RESUME_STEPS
    if written == resumed_as:
        assert losses == ref_losses
        for name, value in weights.items():
            assert torch.equal(value, ref_weights[name]), name
    else:
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for name, value in weights.items():
            torch.testing.assert_close(value, ref_weights[name], rtol=1e-4, atol=1e-6, msg=name)


def test_resuming_with_another_number_of_processes_is_refused(tmp_path, straight_runs, capsys):
    from trainer.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(_flags(tmp_path, "one", parallel="ddp", steps=RESUME_STEPS + 2,
                    resume=str(straight_runs("ddp"))))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--nproc_per_node" in err and "2 process(es)" in err and "got 1" in err, err


def _save_worker(rank, world, init_file, config_dir, run_dir, fail_rank, results):
    """One rank of a 2-process gloo group saving two checkpoints; on `fail_rank` the second
    save fails (out of disk) after the shared DCP part, on that rank only."""
    import errno

    import torch.distributed as dist

    from trainer import checkpoint as ckpt

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        ctx = distributed.Context(rank, world, torch.device("cpu"), "ddp")
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        config = small_config(config_dir)
        kw = dict(model=model, optimizer=optimizer, scheduler=schedule, config=config, ctx=ctx)
        ckpt.save(Path(run_dir), step=1, **kw)
        if rank == fail_rank:
            def full():
                raise OSError(errno.ENOSPC, "No space left on device")
            ckpt.rng_state = full
        try:
            ckpt.save(Path(run_dir), step=2, **kw)
            outcome = "saved"
        except ckpt.CheckpointError as exc:
            outcome = f"CheckpointError: {exc}"
        Path(results, f"rank{rank}").write_text(outcome)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fail_rank", [0, 1])
def test_a_save_failing_on_one_rank_fails_on_every_rank_and_keeps_the_previous(tmp_path,
                                                                              fail_rank):
    import torch.multiprocessing as mp

    run_dir, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    mp.start_processes(_save_worker, nprocs=2, start_method="spawn", join=True,
                       args=(2, str(tmp_path / "init"), str(tmp_path), str(run_dir),
                             fail_rank, str(results)))
    outcomes = [(results / f"rank{r}").read_text() for r in range(2)]
    for outcome in outcomes:   # no rank went on alone, none hung
        assert outcome.startswith("CheckpointError") and "step 2" in outcome, outcomes
        assert "step-00000001 is intact" in outcome, outcome
    own = outcomes[fail_rank]
    assert "No space left on device" in own, own
    assert f"rank(s) [{fail_rank}]" in outcomes[1 - fail_rank], outcomes
    from trainer import checkpoint as ckpt

    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000001"]
    assert ckpt.latest(run_dir).name == "step-00000001"


def test_real_data_under_torchrun_reads_a_shard_per_rank_and_sums_the_skips(tmp_path):
    """--data under 2 processes: rank 0 holds the corrupt image's record, rank 1 the
    missing image's (--no-shuffle: record i -> rank i % 2), and rank 0's metrics count
    both."""
    from test_real_data import RECORDS, _tiny_llm, make_dataset

    root = make_dataset(tmp_path)
    ids = [r["id"] if r else None for r in RECORDS]
    assert ids.index("corrupt") % 2 == 0 and ids.index("missing") % 2 == 1
    llm = _tiny_llm(tmp_path)
    _launch(_flags(tmp_path, "real", parallel="ddp", llm=str(llm), num_workers=0,
                   data=str(root / "train.jsonl"), shuffle=False), 2)
    rows = [json.loads(line) for line in (tmp_path / "real" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["event"] == "train"][-1]
    assert last["world_size"] == 2
    assert last["skipped/bad_image"] >= 1 and last["skipped/missing_image"] >= 1, last
    for task in TASKS:
        assert last[f"loss/{task}"] is not None and math.isfinite(last[f"loss/{task}"]), last


def test_real_data_under_torchrun_resumes_each_ranks_data_position(tmp_path):
    """--data, 2 processes, 2 DataLoader workers each: the checkpoint holds each rank's
    own reader positions (different shards), and the resumed run logs the losses of the
    uninterrupted one bit for bit."""
    from test_real_data import _tiny_llm, make_dataset

    root = make_dataset(tmp_path)
    llm = _tiny_llm(tmp_path)
    flags = dict(parallel="ddp", llm=str(llm), num_workers=2, data=str(root / "train.jsonl"),
                 steps=4, checkpoint_every=2, keep_checkpoints=2)
    _launch(_flags(tmp_path, "straight", **flags), 2)
    straight = tmp_path / "straight"
    saved = straight / "checkpoints" / "step-00000002"
    states = [torch.load(saved / f"data-0000{r}.pt", weights_only=False)["real"]
              for r in range(2)]
    assert all(s["in_turn"] and s["taken_at"] for s in states)
    assert states[0]["taken_at"] != states[1]["taken_at"]   # each rank its own shard
    resumed = tmp_path / "resumed"
    _copy_to_resume(straight, resumed)
    _launch(_flags(tmp_path, "ignored", **flags,
                   resume=str(resumed / "checkpoints" / "step-00000002")), 2)
    (losses, weights), (ref_losses, ref_weights) = _result(resumed), _result(straight)
    assert losses == ref_losses and len(losses) == 4
    for name, value in weights.items():
        assert torch.equal(value, ref_weights[name]), name


def test_a_timed_out_launch_kills_the_workers_in_their_own_sessions(tmp_path):
    """What _launch does on a timeout: a grandchild in a session of its own (as torchrun
    starts its workers) is found and killed, so the pipe closes."""
    script = ("import subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
              "start_new_session=True)\n"
              "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for _ in range(100):   # until the grandchild exists
        if _descendants(proc.pid):
            break
        time.sleep(0.05)
    [worker] = _descendants(proc.pid)
    _kill_tree(proc.pid)
    proc.communicate(timeout=30)   # would block for ten minutes with the worker alive
    for _ in range(200):           # SIGKILL is delivered asynchronously
        if not os.path.exists(f"/proc/{worker}") or _zombie(worker):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"worker {worker} outlived the kill")


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:   # gone meanwhile
        return True
