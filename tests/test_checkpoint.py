"""Resumable checkpoints (trainer/checkpoint.py): a resumed run logs the identical loss
curve, a save killed midway or out of disk leaves the previous checkpoint whole (and
`auto` ignores the partial one), the last K are kept, an incompatible configuration and a
missing path are refused before training starts."""
import errno
import json

import pytest

from trainer import checkpoint as ckpt
from trainer.__main__ import main
from trainer.config import ConfigError, build_config
from trainer.loop import train
from trainer_helpers import SMALL, small_config, train_rows


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs."""


def _kill_after_save(monkeypatch, at_step):
    real = ckpt.save

    def save(run_dir, **kw):
        path = real(run_dir, **kw)
        if kw["step"] == at_step:
            raise Killed(path)
        return path

    monkeypatch.setattr(ckpt, "save", save)


def _losses(rows):
    return [(r["step"], r["loss"], r["loss/und"], r["loss/pixel"], r["loss/depth"],
             r["loss/seg"], r["lr"], r["grad_norm"]) for r in rows]


# ar at step 2: the LM head has had no gradient yet (no und sample), so AdamW holds no
# state for it; the resumed run must keep it stateless too.
@pytest.mark.parametrize("family, n, extra", [
    ("ar", 2, {}), ("mar", 3, {}), ("flow", 3, {}),
    ("mar", 2, {"schedule": "round-robin"}), ("ar", 3, {"packs_per_step": 2, "recipe": "sgt"})],
    ids=["ar", "mar", "flow", "mar-round-robin", "ar-sgt-2-packs"])
def test_resume_continues_the_identical_loss_curve(tmp_path, monkeypatch, family, n, extra):
    straight = train_rows(train(small_config(tmp_path / "a", family=family, steps=2 * n,
                                             checkpoint_every=n, **extra)))
    _kill_after_save(monkeypatch, n)
    with pytest.raises(Killed) as info:
        train(small_config(tmp_path / "b", family=family, steps=2 * n, checkpoint_every=n,
                           **extra))
    monkeypatch.undo()
    saved = info.value.args[0]
    assert saved.name == f"step-{n:08d}" and (saved / "COMPLETE").is_file()
    run_dir = train(small_config(tmp_path / "b", family=family, steps=2 * n,
                                 checkpoint_every=n, resume=str(saved), **extra))
    assert run_dir == ckpt.run_dir_of(saved)
    resumed = train_rows(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 2 * n + 1))
    assert _losses(resumed) == _losses(straight)   # bit-exact, every logged value
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["event"] == "eval"]
    assert [r["when"] for r in evals] == ["before", "after"]


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real = ckpt._write_tensors

    def half_written(path, model, optimizer):
        if path.name.startswith(".step-00000004"):
            real(path, model, optimizer)   # the tensors land, state.pt / COMPLETE never do
            raise Killed()
        real(path, model, optimizer)

    monkeypatch.setattr(ckpt, "_write_tensors", half_written)
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: None)  # a kill cleans nothing
    with pytest.raises(Killed):
        train(small_config(tmp_path, steps=6, checkpoint_every=2, family="ar"))
    monkeypatch.undo()
    run_dir = next(tmp_path.iterdir())
    left = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert left == [".step-00000004.tmp", "step-00000002"], left
    found = ckpt.resolve("auto", str(run_dir))
    assert found.name == "step-00000002"
    resumed = train(small_config(tmp_path, steps=6, checkpoint_every=2, family="ar",
                                 resume="auto", resume_dir=str(run_dir)))
    assert [r["step"] for r in train_rows(resumed)] == list(range(1, 7))
    # the stale temporary directory is cleared by the next save's pruning
    assert [p.name for p in (run_dir / "checkpoints").iterdir()
            if p.name.startswith(".")] == []


def test_disk_full_stops_the_run_with_the_previous_checkpoint_intact(tmp_path, monkeypatch,
                                                                     capsys):
    real = ckpt._write_tensors

    def full(path, model, optimizer):
        if path.name.startswith(".step-00000004"):
            (path / "partial.distcp").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, model, optimizer)

    monkeypatch.setattr(ckpt, "_write_tensors", full)
    code = main(_flags(tmp_path) + ["--steps", "6", "--checkpoint-every", "2", "--family", "ar"])
    assert code == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step 4" in err and "step-00000002" in err, err
    run_dir = tmp_path / "run"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000002"]
    state = ckpt.read_state(run_dir / "checkpoints" / "step-00000002")
    assert state["step"] == 2


def _flags(tmp_path):
    return ["--out", str(tmp_path), "--name", "run"] + [
        f"--{k.replace('_', '-')}={v}" if not isinstance(v, bool) else
        f"--{'' if v else 'no-'}{k.replace('_', '-')}" for k, v in SMALL.items()]


def test_command_line_resume_auto(tmp_path, capsys):
    assert main(_flags(tmp_path) + ["--steps", "2", "--checkpoint-every", "2", "--family", "ar"]) == 0
    run_dir = tmp_path / "run"
    assert main(_flags(tmp_path / "other") + ["--steps", "4", "--checkpoint-every", "2",
                                              "--family", "ar", "--resume", "auto",
                                              "--resume-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "step 2" in out and f"run directory: {run_dir}" in out
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3, 4]
    assert not (tmp_path / "other").exists()


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    run_dir = train(small_config(tmp_path, steps=5, checkpoint_every=1, keep_checkpoints=3,
                                 family="ar"))
    assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == [
        "step-00000003", "step-00000004", "step-00000005"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-00000003", "step-00000004", "step-00000005"]


def test_incompatible_config_is_refused_naming_the_fields(tmp_path):
    run_dir = train(small_config(tmp_path, steps=2, checkpoint_every=2, family="ar"))
    path = str(ckpt.latest(run_dir))
    with pytest.raises(ConfigError) as info:
        train(small_config(tmp_path, steps=4, family="mar", hidden_size=64, seed=3, resume=path))
    message = str(info.value)
    assert message.startswith("--resume")
    for field in ("model.family", "model.hidden_size", "data.seed"):
        assert field in message, message
    assert "optim.steps" not in message and "run." not in message
    with pytest.raises(ConfigError, match="--steps > 2"):
        train(small_config(tmp_path, steps=2, family="ar", resume=path))


def test_longer_schedule_may_continue_a_finished_run(tmp_path):
    run_dir = train(small_config(tmp_path, steps=2, checkpoint_every=2, family="ar"))
    train(small_config(tmp_path, steps=4, checkpoint_every=2, family="ar",
                       resume=str(run_dir)))
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3, 4]


@pytest.mark.parametrize("args, message", [
    (["--resume", "/no/such/checkpoint"], "no such checkpoint"),
    (["--resume", "auto"], "needs --resume-dir"),
    (["--resume", "auto", "--resume-dir", "/no/such/run"], "--resume-dir"),
])
def test_missing_checkpoint_exits_2_before_training(tmp_path, args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(args + ["--out", str(tmp_path / "never")])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_auto_with_no_complete_checkpoint_exits_2(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints" / "step-00000002").mkdir(parents=True)  # no COMPLETE
    with pytest.raises(SystemExit) as info:
        main(["--resume", "auto", "--resume-dir", str(tmp_path / "run"),
              "--out", str(tmp_path / "never")])
    assert info.value.code == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_a_failure_inside_dcp_is_a_checkpoint_error(tmp_path, monkeypatch, capsys):
    """DCP wraps a writer's failure in its CheckpointException (a BaseException): the run
    still stops with the checkpoint error and the previous checkpoint intact."""
    from torch.distributed.checkpoint import filesystem

    real = filesystem._FileSystemWriter.write_data

    def write_data(self, plan, planner):
        if ".step-00000004" in str(self.path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, plan, planner)

    monkeypatch.setattr(filesystem._FileSystemWriter, "write_data", write_data)
    code = main(_flags(tmp_path) + ["--steps", "6", "--checkpoint-every", "2", "--family", "ar"])
    assert code == 1
    err = capsys.readouterr().err
    assert "rank 0: [Errno 28] No space left on device" in err and "step-00000002" in err, err
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000002"]


def test_the_tiny_preset_resumes_bit_exact(tmp_path, monkeypatch):
    """The main job's own preset (not the smaller test model): killed after its step-3
    checkpoint and resumed, it logs the uninterrupted run's values exactly."""
    common = dict(out=str(tmp_path), steps=6, checkpoint_every=3, eval_questions=2,
                  log_every=1, progress=False, tensorboard=False)
    straight = train_rows(train(build_config("tiny", {**common, "name": "straight"})))
    _kill_after_save(monkeypatch, 3)
    with pytest.raises(Killed) as info:
        train(build_config("tiny", {**common, "name": "killed"}))
    monkeypatch.undo()
    resumed = train_rows(train(build_config("tiny", {**common, "name": "killed",
                                                     "resume": str(info.value.args[0])})))
    assert _losses(resumed) == _losses(straight)
