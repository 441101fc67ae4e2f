"""Resumable checkpoints (trainer/checkpoint.py): a resumed run logs the identical loss
curve (a longer one at its own schedule's lr), a save killed midway or out of disk leaves
the previous checkpoint whole (and `auto` ignores the partial one), a kill while pruning or
re-saving a step leaves no half-deleted checkpoint that looks complete, the last K are
kept, resuming an older checkpoint moves the later ones aside, an incompatible
configuration, a checkpoint outside its run and a missing path are refused before training
starts, a failure to write checkpoint.pt is a clean error, and a torn metrics line does not
stop a resume."""
import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer import report
from trainer.__main__ import main
from trainer.config import Config, ConfigError, build_config
from trainer.loop import build_optimizer, train
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


def test_resume_loads_the_data_state_and_an_older_checkpoint_replays(tmp_path, monkeypatch,
                                                                      capsys):
    # The data position is state (data-00000.pt): the resumed run makes only the packs of
    # the steps after the checkpoint. A checkpoint without it replays the earlier steps.
    from trainer.data import PackStream

    def config(where, **kw):
        return small_config(where, family="mar", steps=6, checkpoint_every=3,
                            packs_per_step=2, **kw)

    straight = train_rows(train(config(tmp_path / "a")))
    _kill_after_save(monkeypatch, 3)
    with pytest.raises(Killed) as info:
        train(config(tmp_path / "b"))
    monkeypatch.undo()
    saved = info.value.args[0]
    assert (saved / "data-00000.pt").is_file()
    old_run = tmp_path / "c" / saved.parent.parent.name
    shutil.copytree(saved.parent.parent, old_run)
    old = old_run / "checkpoints" / saved.name
    (old / "data-00000.pt").unlink()

    calls = []
    real_step = PackStream.next_packs   # one call a step (interleaved: one stream)
    monkeypatch.setattr(PackStream, "next_packs", lambda self: calls.append(1) or real_step(self))
    for checkpoint, made in ((saved, 3), (old, 6)):
        calls.clear()
        capsys.readouterr()
        resumed = train_rows(train(config(tmp_path / "b", resume=str(checkpoint))))
        assert _losses(resumed) == _losses(straight), checkpoint
        assert len(calls) == made, checkpoint
        assert ("replaying the data stream to step 3" in capsys.readouterr().out) == (made == 6)


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
        train(small_config(tmp_path, steps=4, family="mar", hidden_size=64, seed=3, resume=path,
                           eval_questions=2, eval_scenes=2))
    message = str(info.value)
    assert message.startswith("--resume")
    # the held-out sets too: the summary compares the checkpoint's evaluation before
    # training with the resumed run's after it
    for field in ("model.family", "model.hidden_size", "data.seed", "data.eval_questions",
                  "data.eval_scenes"):
        assert field in message, message
    assert "optim.steps" not in message and "run." not in message
    with pytest.raises(ConfigError, match="--steps >= 2, got 1"):
        train(small_config(tmp_path, steps=1, family="ar", resume=path))


def test_longer_schedule_may_continue_a_finished_run(tmp_path):
    run_dir = train(small_config(tmp_path, steps=2, checkpoint_every=2, family="ar"))
    train(small_config(tmp_path, steps=4, checkpoint_every=2, family="ar",
                       resume=str(run_dir)))
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # from the restored step on, the 4-step schedule's lr (not the finished 2-step
    # schedule's, which ended at 0): exactly what a straight 4-step run uses
    optimizer, schedule = build_optimizer(torch.nn.Linear(2, 2), small_config(tmp_path, steps=4),
                                          torch.device("cpu"))
    lrs = []
    for _ in range(4):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert [r["lr"] for r in rows] == lrs and lrs[2] > 0, ([r["lr"] for r in rows], lrs)


@pytest.mark.parametrize("args, message", [
    (["--resume", "/no/such/checkpoint"], "no such checkpoint"),
    (["--resume", "auto"], "needs --resume-dir"),
    (["--resume", "auto", "--resume-dir", "/no/such/run"], "--resume-dir"),
    (["--resume-dir", "."], "--resume-dir: only used with --resume auto"),
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


def test_resuming_an_older_checkpoint_moves_the_later_ones_aside(tmp_path, monkeypatch, capsys):
    """Resuming step 4 while step 6 exists starts a new timeline from step 4: step 6 is
    moved to checkpoints/abandoned/ (kept, but out of `auto`'s and pruning's way), so a
    crash before the next save resumes step 4 again, not the abandoned step 6."""
    common = dict(steps=6, checkpoint_every=2, family="ar")
    run_dir = train(small_config(tmp_path, **common))
    straight = train_rows(run_dir)
    older = run_dir / "checkpoints" / "step-00000004"
    assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == [older.name, "step-00000006"]

    def killed_before_saving(run_dir, **kw):
        raise Killed()

    monkeypatch.setattr(ckpt, "save", killed_before_saving)
    with pytest.raises(Killed):
        train(small_config(tmp_path, resume=str(older), **common))
    monkeypatch.undo()
    assert "moved the later checkpoint step-00000006" in capsys.readouterr().out
    assert ckpt.resolve("auto", str(run_dir)) == older
    abandoned = run_dir / "checkpoints" / "abandoned"
    [moved] = list(abandoned.iterdir())
    assert moved.name.startswith("step-00000006-") and (moved / "COMPLETE").is_file()
    resumed = train(small_config(tmp_path, resume="auto", resume_dir=str(run_dir), **common))
    assert _losses(train_rows(resumed)) == _losses(straight)
    assert list(abandoned.iterdir()) == [moved]   # pruning leaves it alone


@pytest.mark.parametrize("left_by", ["a kill before its rename", "a re-save's kill"])
def test_resuming_an_older_checkpoint_abandons_a_later_one_sealed_under_a_hidden_name(
        tmp_path, monkeypatch, left_by):
    """A later step left whole under a hidden name must go with its timeline: else the
    next `auto` (restore_sealed) brings it back, skipping the steps of the new one."""
    common = dict(steps=6, checkpoint_every=2, family="ar", keep_checkpoints=3)
    run_dir = train(small_config(tmp_path, **common))
    straight = train_rows(run_dir)
    root = run_dir / "checkpoints"
    (root / "step-00000006").rename(root / ".step-00000006.tmp")
    if left_by.startswith("a re-save"):   # the old copy aside, the new one already in
        shutil.copytree(root / ".step-00000006.tmp", root / "step-00000006")
        (root / ".step-00000006.tmp").rename(root / ".step-00000006.old")

    def killed_before_saving(run_dir, **kw):
        raise Killed()

    monkeypatch.setattr(ckpt, "save", killed_before_saving)
    with pytest.raises(Killed):
        train(small_config(tmp_path, resume=str(root / "step-00000002"), **common))
    monkeypatch.undo()
    assert ckpt.resolve("auto", str(run_dir)) == root / "step-00000002"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    resumed = train(small_config(tmp_path, resume="auto", resume_dir=str(run_dir), **common))
    assert _losses(train_rows(resumed)) == _losses(straight)


def test_a_kill_while_abandoning_later_checkpoints_leaves_their_metrics(tmp_path, monkeypatch):
    """The later checkpoints are moved aside before the metrics are cut: a kill in between
    leaves `auto` a checkpoint whose metrics rows are all there (no gap in the curve)."""
    common = dict(steps=6, checkpoint_every=2, family="ar", keep_checkpoints=3)
    run_dir = train(small_config(tmp_path, **common))
    straight = train_rows(run_dir)

    def killed(run_dir, step):
        raise Killed()

    monkeypatch.setattr(ckpt, "abandon_newer", killed)
    with pytest.raises(Killed):
        train(small_config(tmp_path, resume=str(run_dir / "checkpoints" / "step-00000002"),
                           **common))
    monkeypatch.undo()
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, 7))
    assert ckpt.resolve("auto", str(run_dir)).name == "step-00000006"


def test_a_failure_while_pruning_warns_and_keeps_the_new_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _tiny_saves(tmp_path, run_dir, [1], keep=1)
    real_rename = ckpt.os.rename

    def rename(src, dst):
        if str(dst).endswith(ckpt.DELETING):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.warns(RuntimeWarning, match="could not prune old checkpoints.*Input/output "
                                            "error.*step-00000002 is complete"):
        _tiny_saves(tmp_path, run_dir, [2], keep=1)
    monkeypatch.undo()
    assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == ["step-00000001",
                                                                    "step-00000002"]
    _tiny_saves(tmp_path, run_dir, [3], keep=1)   # the next save prunes
    assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == ["step-00000003"]


def _tiny_saves(tmp_path, run_dir, steps, keep=10):
    """Checkpoints of an nn.Linear (no training run): enough for save / prune."""
    config = small_config(tmp_path)
    model = torch.nn.Linear(4, 4)
    optimizer, schedule = build_optimizer(model, config, torch.device("cpu"))
    for step in steps:
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        ckpt.save(run_dir, step=step, model=model, optimizer=optimizer, scheduler=schedule,
                  config=config, keep=keep)


def _killed_rmtree(monkeypatch, doomed):
    """shutil.rmtree that deletes one file of a directory `doomed(path)` picks, then dies."""
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if doomed(Path(path)):
            next(Path(path).glob("*.distcp")).unlink()
            raise Killed(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)


def test_a_kill_while_pruning_leaves_no_partial_checkpoint_that_looks_complete(tmp_path,
                                                                                monkeypatch):
    run_dir = tmp_path / "run"
    _tiny_saves(tmp_path, run_dir, [1, 2, 3])
    files = sorted(p.name for p in (run_dir / "checkpoints" / "step-00000003").iterdir())
    _killed_rmtree(monkeypatch, lambda path: "00000001" in path.name)
    with pytest.raises(Killed):
        ckpt.prune(run_dir, 1)
    monkeypatch.undo()
    found = ckpt.complete_checkpoints(run_dir)
    assert [p.name for p in found] == ["step-00000002", "step-00000003"]
    for path in found:
        assert sorted(p.name for p in path.iterdir()) == files, path
    ckpt.prune(run_dir, 1)   # the next prune clears what the killed one left
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000003"]


def test_saving_a_step_again_never_deletes_the_live_copy_first(tmp_path, monkeypatch):
    """Re-saving step N renames the old copy aside, renames the new one in, and only then
    deletes the old one: a kill at any point leaves a whole step-N (or the old one aside)."""
    run_dir = tmp_path / "run"
    _tiny_saves(tmp_path, run_dir, [2])
    _killed_rmtree(monkeypatch, lambda path: path.name == "step-00000002")
    _tiny_saves(tmp_path, run_dir, [2])
    monkeypatch.undo()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002"]
    assert ckpt.read_state(ckpt.latest(run_dir))["step"] == 2


@pytest.mark.parametrize("killed_at", ["between the re-save's renames", "after sealing"])
def test_a_checkpoint_sealed_under_a_hidden_name_is_restored_on_resume(tmp_path, monkeypatch,
                                                                      killed_at):
    """A kill after seal() wrote COMPLETE but before the renames finished leaves a whole
    checkpoint under a hidden name; `--resume auto` puts it back (the newest copy)."""
    run_dir = tmp_path / "run"
    _tiny_saves(tmp_path, run_dir, [2] if killed_at.startswith("between") else [])
    real_rename = ckpt.os.rename

    def rename(src, dst):   # the kill: the sealed .tmp is never renamed in
        if Path(src).name == f".{ckpt.PREFIX}00000002{ckpt.TMP}":
            raise Killed(src)
        return real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: None)   # nothing runs after it
    with pytest.raises(Killed):
        # a re-save: step 2's new copy is a schedule step further than the old one
        _tiny_saves(tmp_path, run_dir, [1, 2] if killed_at.startswith("between") else [2])
    monkeypatch.undo()
    root = run_dir / "checkpoints"
    assert "step-00000002" not in {p.name for p in root.iterdir()}
    assert ckpt.latest(run_dir) in (None, root / "step-00000001")
    found = ckpt.resolve("auto", str(run_dir))
    assert found == root / "step-00000002"
    # the sealed new copy, not the old one: its schedule went one step further
    want = 2 if killed_at.startswith("between") else 1
    assert ckpt.read_state(found)["scheduler"]["last_epoch"] == want
    _tiny_saves(tmp_path, run_dir, [4])   # the next save prunes stale temporaries only
    assert [p.name for p in ckpt.complete_checkpoints(run_dir)][-2:] == ["step-00000002",
                                                                         "step-00000004"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


class _FullFile:
    """A file on a full disk: every write fails with ENOSPC."""

    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.fh, name)


def test_a_failed_write_releases_the_view_of_its_buffer(monkeypatch):
    # A view left alive sits in a reference cycle with the failure's traceback, and
    # CPython 3.12.0 / 3.12.1 crash (SIGSEGV) collecting it: the disk-full tests below
    # crashed there at the next garbage collection.
    views = []

    class Tracked(report.io.BytesIO):
        def getbuffer(self):
            views.append(super().getbuffer())
            return views[-1]

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report.io, "BytesIO", Tracked)
    with pytest.raises(OSError, match="No space left"):
        report.write_saved({"weights": torch.ones(3)}, Full())
    assert views
    for view in views:
        with pytest.raises(ValueError, match="released"):
            len(view)


@pytest.mark.parametrize("name", ["state.pt", "rng-00000.pt"])
def test_disk_full_while_writing_state_or_rng_is_a_checkpoint_error(tmp_path, monkeypatch,
                                                                     capsys, name):
    """A full disk while the state or RNG file is written (torch.save goes through memory,
    then a plain write, which fails with ENOSPC) ends as the checkpoint error, the
    previous checkpoint intact."""
    real_open = open

    def full(target):
        return ".step-00000004" in str(target) and Path(target).name == name

    def fake_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        return _FullFile(fh) if "w" in mode and full(path) else fh

    monkeypatch.setattr(ckpt, "open", fake_open, raising=False)
    code = main(_flags(tmp_path) + ["--steps", "6", "--checkpoint-every", "2", "--family", "ar"])
    assert code == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step 4" in err and "step-00000002" in err, err
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000002"]


@pytest.mark.parametrize("steps", [4, 2], ids=["after-an-intermediate-save", "at-the-end"])
def test_disk_full_writing_checkpoint_pt_is_a_clean_error(tmp_path, monkeypatch, capsys, steps):
    real = report.atomic_write

    def atomic_write(path, write):
        if path.name == report.CHECKPOINT:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, write)

    monkeypatch.setattr(report, "atomic_write", atomic_write)
    flags = _flags(tmp_path) + ["--checkpoint-every", "2", "--family", "ar"]
    assert main(flags + ["--steps", str(steps)]) == 1
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "No space left on device" in err, err
    assert "step-00000002 is intact" in err, err
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == ["step-00000002"]
    # the checkpoint just written resumes; at the last step (killed in the final outputs)
    # the same command finishes the run: no step is trained again
    assert main(flags + ["--steps", str(steps), "--resume", str(run_dir)]) == 0
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, steps + 1))
    assert (run_dir / report.CHECKPOINT).is_file() and (run_dir / "summary.json").is_file()
    evals = [r["when"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text()
                                    .splitlines()) if r["event"] == "eval"]
    assert evals == ["before", "after"], evals


def test_a_torn_last_metrics_line_does_not_stop_a_resume(tmp_path):
    run_dir = train(small_config(tmp_path, steps=2, checkpoint_every=2, family="ar"))
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"event": "train", "step": 3, "lo')   # killed
    train(small_config(tmp_path, steps=4, checkpoint_every=2, family="ar", resume=str(run_dir)))
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3, 4]


def test_a_checkpoint_copied_out_of_its_run_is_refused(tmp_path, capsys):
    run_dir = train(small_config(tmp_path / "runs", steps=2, checkpoint_every=2, family="ar"))
    copy = tmp_path / "backup" / "step-00000002"
    shutil.copytree(ckpt.latest(run_dir), copy)
    with pytest.raises(SystemExit) as info:
        main(_flags(tmp_path / "never") + ["--steps", "4", "--checkpoint-every", "2",
                                           "--family", "ar", "--resume", str(copy)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "checkpoints/" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup", "runs"]
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == ["step-00000002"]


def test_a_stored_config_loads_after_its_paths_are_gone(tmp_path):
    """checkpoint.pt of a resumed run stores --resume (a checkpoint keep-K may prune since)
    and the device it ran on: Config.from_dict restores them without checking again."""
    source = tmp_path / "run"
    source.mkdir()
    for run in (dict(resume=str(source)), dict(resume="auto", resume_dir=str(source))):
        stored = small_config(tmp_path, **run).to_dict()
        stored["run"]["device"] = "cuda"   # trained on a GPU, loaded where there is none
        source.rmdir()
        loaded = Config.from_dict(stored)
        source.mkdir()
        assert loaded.to_dict() == stored


def test_rng_states_live_in_one_file_per_rank_and_load_back(tmp_path, monkeypatch):
    """Rank 0's RNG states are in rng-00000.pt only (not again in state.pt); load returns
    the states the save took, and a checkpoint without its rank's file is refused naming
    the file."""
    run_dir = tmp_path / "run"
    taken, real = [], ckpt.rng_state
    monkeypatch.setattr(ckpt, "rng_state", lambda: taken.append(real()) or taken[-1])
    _tiny_saves(tmp_path, run_dir, [1])
    monkeypatch.undo()
    torch.manual_seed(0)   # the live state moves on: load must not read it
    path = ckpt.latest(run_dir)
    assert "rng" not in ckpt.read_state(path)
    config = small_config(tmp_path)
    model = torch.nn.Linear(4, 4)
    optimizer, schedule = build_optimizer(model, config, torch.device("cpu"))
    kw = dict(model=model, optimizer=optimizer, scheduler=schedule)
    state = ckpt.load(path, **kw)
    assert len(taken) == 1 and not torch.equal(taken[0]["torch"], torch.get_rng_state())
    assert torch.equal(state["rng"]["torch"], taken[0]["torch"])
    assert repr(state["rng"]["numpy"]) == repr(taken[0]["numpy"])
    (path / "rng-00000.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match="rng-00000.pt"):
        ckpt.load(path, **kw)


def test_a_resumed_runs_config_starts_a_fresh_run_and_names_its_directory(tmp_path, capsys):
    flags = _flags(tmp_path) + ["--checkpoint-every", "2", "--family", "ar"]
    assert main(flags + ["--steps", "2"]) == 0
    run_dir = tmp_path / "run"
    assert main(_flags(tmp_path / "elsewhere") + ["--checkpoint-every", "2", "--family", "ar",
                                                  "--steps", "4", "--resume", str(run_dir)]) == 0
    assert "--out / --name are not used when resuming" in capsys.readouterr().out
    import yaml

    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["run"]["resume"] is None and written["run"]["resume_dir"] is None
    assert (written["run"]["out"], written["run"]["name"]) == (str(tmp_path), "run")
    stored = ckpt.read_state(ckpt.latest(run_dir))["config"]["run"]
    assert (stored["out"], stored["name"]) == (str(tmp_path), "run")


@pytest.mark.parametrize("damage", ["empty state.pt", "a shard gone"])
def test_a_damaged_checkpoint_is_a_clean_error(tmp_path, capsys, damage):
    flags = _flags(tmp_path) + ["--checkpoint-every", "2", "--family", "ar"]
    assert main(flags + ["--steps", "2"]) == 0
    step = tmp_path / "run" / "checkpoints" / "step-00000002"
    if damage == "empty state.pt":
        (step / "state.pt").write_bytes(b"")
    else:
        next(step.glob("*.distcp")).unlink()
    code = None
    try:
        code = main(flags + ["--steps", "4", "--resume", str(step)])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == (2 if damage == "empty state.pt" else 1), err
    assert "damaged" in err and "resume an earlier" in err, err
    assert "Traceback" not in err


def test_a_checkpoint_of_an_unfused_adamw_resumes(tmp_path, monkeypatch):
    """Checkpoints of CPU runs before AdamW was fused there hold param groups with
    fused=None; loaded as saved, they sent the skip-by-found_inf step to the unfused code
    (an AssertionError on the first resumed step). The resumed run keeps its own flavour."""
    from trainer import loop

    real = loop.build_optimizer
    monkeypatch.setattr(loop, "build_optimizer",   # an older run: plain AdamW on the CPU
                        lambda model, config, device: real(model, config, torch.device("meta")))
    settings = dict(steps=4, checkpoint_every=2, family="ar", eval_questions=0, eval_scenes=0)
    run_dir = train(small_config(tmp_path, **settings))
    monkeypatch.undo()
    saved = run_dir / "checkpoints" / "step-00000002"
    resumed = train_rows(train(small_config(tmp_path, resume=str(saved), **settings)))
    assert [r["step"] for r in resumed][-1] == 4
    assert all(r["loss"] == r["loss"] for r in resumed)   # finite: a NaN loss stops the run
