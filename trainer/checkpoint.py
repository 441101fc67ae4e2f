"""Resumable checkpoints: <run>/checkpoints/step-NNNNNNNN/, written atomically.

One checkpoint is a directory holding

    .metadata, __*.distcp   model (trainable weights) and AdamW state, written by
                            torch.distributed.checkpoint (DCP: sharded-safe; on one process
                            it needs no process group)
    state.pt                the rest: step, LR scheduler, the data position, the number
                            of processes, the config, the evaluation before training and
                            the skipped-step counters
    rng-RRRRR.pt            each rank's own RNG states (torch CPU, CUDA when present,
                            numpy, python; one file per rank, rank 0's too)
    data-RRRRR.pt           each rank's data position as state (trainer.data.TrainData:
                            the samples waiting for a pack, where each reader of the
                            real data stands)
    COMPLETE                written last: a directory without it is ignored

It is written into a hidden temporary directory next to its final place, every file
fsync'd, COMPLETE written, then renamed into place (rename is atomic), so a run killed
or out of disk during a save leaves the previous checkpoint whole and resumable (files are
serialised in memory and written with plain writes, so a full disk is an OSError wherever
it strikes). A step saved again has its old copy renamed aside before the new one is
renamed in, and deleted only then. The last --keep-checkpoints are kept; an older one is
renamed to a hidden name before it is deleted, so a kill mid-delete never leaves a
directory that looks complete. Resuming from a checkpoint that is not the run's latest
moves the later ones to checkpoints/abandoned/step-N-<UTC time> (their timeline is
replaced; kept, but out of `auto`'s and pruning's way). A checkpoint resumes only inside
its run's checkpoints/ folder: the run continues in that run directory.
Under torchrun every rank writes its part into the same
directory (a filesystem all ranks share, as DCP assumes); rank 0 seals and renames it
only after every rank's part is written, and a failure on any rank fails the save on
every rank, the previous checkpoint intact. A checkpoint resumes with the number of
processes that wrote it (the data split depends on it); DDP and FSDP2 checkpoints are the
same DCP format.

The data position is the number of optimizer steps taken, plus each rank's data state
(data-RRRRR.pt: TrainData.state_dict()). Resuming loads that state, so the next packs
follow without regenerating a sample before them (with real data that would decode every
image read so far again). Where there is none (a checkpoint from before it) or it cannot
be continued exactly (a real-data reader ran dry), the packs being a pure function of the
config and the sample index (trainer/data.py), the resumed run replays `step` calls of
TrainData.step() instead (host work only: samples and packing, no model).
The learning rate is the resumed run's schedule at the restored step (--steps may grow).
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from trainer.config import PATH_FIELDS, Config, ConfigError, without_effect
from trainer.report import write_saved

DIRNAME, COMPLETE, STATE = "checkpoints", "COMPLETE", "state.pt"
PREFIX, ABANDONED = "step-", "abandoned"
# Hidden names next to the checkpoints: a save being written, a re-saved step's previous
# copy, a pruned one being deleted. None counts as a checkpoint; prune clears stale ones.
TMP, OLD, DELETING = ".tmp", ".old", ".del"

# Fields that may differ between the checkpoint's run and the resumed one: how and where
# the run executes, what it logs, and optim.steps (the schedule is rebuilt for the new
# length from the restored step on; the new length must exceed that step). The held-out
# sizes (data.eval_questions, data.eval_scenes) must match: the summary compares the
# checkpoint's evaluation before training with the resumed run's after it.
MAY_DIFFER = {
    "preset",                     # only a starting point: the fields themselves are compared
    "model.gradient_checkpointing",
    "optim.steps",
}
MAY_DIFFER_SECTIONS = {"run"}
# Fields added after checkpoints were first written, with the value every run before them
# had: an older checkpoint without the key compares as that value (model.tie_word_embeddings
# is compared like any other field: a resume that ties or unties the LM head is refused).
ADDED_FIELDS = {
    "model.tie_word_embeddings": False,
}


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the previous one is intact) or read."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / DIRNAME / f"{PREFIX}{step:08d}"


def complete_checkpoints(run_dir: Path) -> List[Path]:
    """Complete checkpoints of a run, oldest first (partial / temporary ones ignored)."""
    root = Path(run_dir) / DIRNAME
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit() and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(run_dir: Path) -> Optional[Path]:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def restore_sealed(run_dir: Path) -> None:
    """Puts back a whole checkpoint that a kill left under a hidden name: after seal()
    wrote COMPLETE into `.step-N.tmp` but before its rename, or (a re-save of step N)
    between renaming the live copy to `.step-N.old` and the new one in. With `step-N`
    missing, the sealed new copy wins, else the old one. resolve() calls it before it
    looks for the latest checkpoint of a run directory (`auto` would miss the step, and
    the run's next save would prune it as a stale temporary); not prune() itself: a
    resume from an explicit earlier checkpoint abandons what came later. Every rank of a
    torchrun run may call it at once: a rename another rank made first fails, and is
    skipped."""
    root = Path(run_dir) / DIRNAME
    for tmp in sorted(root.glob(f".{PREFIX}*{TMP}")) + sorted(root.glob(f".{PREFIX}*{OLD}")):
        final = root / tmp.name[1:-len(TMP if tmp.name.endswith(TMP) else OLD)]
        if not final.exists() and (tmp / COMPLETE).is_file():
            try:
                os.rename(tmp, final)
            except OSError:
                pass


def resolve(resume: str, resume_dir: Optional[str]) -> Path:
    """The checkpoint directory named by --resume PATH|auto (and --resume-dir). RunConfig
    has checked the flags themselves (auto comes with --resume-dir, the paths exist)."""
    if resume == "auto":
        restore_sealed(Path(resume_dir))
        found = latest(Path(resume_dir))
        if found is None:
            raise ConfigError("--resume", f"no complete checkpoint in {resume_dir!r} "
                                          f"(looked in {Path(resume_dir) / DIRNAME})")
        return found
    path = Path(resume)
    if (path / COMPLETE).is_file():
        return path
    if path.is_dir():
        restore_sealed(path)
    if path.is_dir() and latest(path) is not None:   # a run directory: its latest
        return latest(path)
    raise ConfigError("--resume", f"{resume!r} is neither a complete checkpoint (a "
                                  f"{DIRNAME}/{PREFIX}N directory with a {COMPLETE} marker) "
                                  f"nor a run directory holding one")


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to: RUN/checkpoints/step-N -> RUN. A
    checkpoint directory anywhere else (e.g. copied out of its run) is refused: the run
    would otherwise continue in whatever its grandparent is."""
    path = Path(checkpoint).resolve()
    if path.parent.name != DIRNAME:
        raise ConfigError("--resume", f"{checkpoint} is not inside a run's {DIRNAME}/ folder "
                                      f"(RUN/{DIRNAME}/{PREFIX}N), so it has no run directory to "
                                      f"continue in; copy it back to RUN/{DIRNAME}/{path.name} of "
                                      f"its run (with the run's metrics.jsonl) and resume that")
    return path.parent.parent


def abandon_newer(run_dir: Path, step: int) -> List[Tuple[Path, Path]]:
    """Resuming from step `step` abandons the run's later complete checkpoints (their
    timeline is replaced): they are moved to checkpoints/abandoned/step-N-<UTC time>,
    where neither `auto` nor pruning looks, so no work is lost. Returns (old, new) paths."""
    import datetime

    # A later step sealed under a hidden name (a kill mid-rename) would come back at the
    # next `auto` (restore_sealed) and bring the abandoned timeline with it: put it in
    # view first so that it is moved with the rest; a hidden copy left beside a visible
    # step is a duplicate of it (the re-save's other copy) and goes.
    restore_sealed(run_dir)
    root = Path(run_dir) / DIRNAME
    for hidden in list(root.glob(f".{PREFIX}*{TMP}")) + list(root.glob(f".{PREFIX}*{OLD}")):
        number = hidden.name[1 + len(PREFIX):-len(TMP if hidden.name.endswith(TMP) else OLD)]
        if number.isdigit() and int(number) > step:
            shutil.rmtree(hidden, ignore_errors=True)
    newer = [p for p in complete_checkpoints(run_dir) if int(p.name[len(PREFIX):]) > step]
    if not newer:
        return []
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    root = root / ABANDONED
    root.mkdir(exist_ok=True)
    moved = []
    for path in newer:
        target, n = root / f"{path.name}-{stamp}", 1
        while target.exists():
            n += 1
            target = root / f"{path.name}-{stamp}-{n}"
        os.rename(path, target)
        moved.append((path, target))
    _fsync_dir(root)
    _fsync_dir(root.parent)
    return moved


# ------------------------------------------------------------------------------- config
def _flat(values: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _same(key: str, old: Any, new: Any) -> bool:
    """Whether a stored setting matches: a path as typed, or naming the same place (the
    files given relative once and absolute now, or the reverse). As typed is enough: a
    run tree moved or copied elsewhere resumes with its own relative flags."""
    if old == new:
        return True
    if key.split(".")[-1] not in PATH_FIELDS or not (isinstance(old, str) and isinstance(new, str)):
        return False
    if os.path.abspath(old) == os.path.abspath(new):
        return True
    try:
        return os.path.samefile(old, new)
    except OSError:
        return False


def config_differences(saved: Dict[str, Any], config: Config) -> List[str]:
    """'section.field (checkpoint X, now Y)' for every field that must match but differs."""
    old, new = {**ADDED_FIELDS, **_flat(saved)}, _flat(config.to_dict())
    # settings without effect in both runs (an older checkpoint may hold ignored values)
    ignored = {f"data.{key}" for key in set(without_effect({"data": old.get("data.data")}))
               & set(without_effect({"data": new.get("data.data")}))}
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in MAY_DIFFER or key.split(".")[0] in MAY_DIFFER_SECTIONS or key in ignored:
            continue
        if not _same(key, old.get(key), new.get(key)):
            diffs.append(f"{key} (checkpoint {old.get(key)!r}, now {new.get(key)!r})")
    return diffs


def check_compatible(saved: Dict[str, Any], config: Config, step: int, path: Path) -> None:
    diffs = config_differences(saved, config)
    if diffs:
        raise ConfigError("--resume", f"the checkpoint {path} was trained with a different "
                                      f"configuration; these settings must match: "
                                      f"{'; '.join(diffs)}")
    # steps == step is allowed: a run killed after its last checkpoint (during the final
    # evaluation or outputs) is finished by resuming it with its own command.
    if config.optim.steps < step:
        raise ConfigError("--steps", f"the checkpoint {path} is at step {step}; resuming "
                                     f"needs --steps >= {step}, got {config.optim.steps}")


def check_world(saved: Dict[str, Any], world: int, path: Path) -> None:
    """The data split and the global batch depend on the number of processes: a resumed
    run must have as many as the run that wrote the checkpoint."""
    before = saved.get("world", 1)
    if before != world:
        raise ConfigError("--nproc_per_node", f"the checkpoint {path} was written by a run of "
                                              f"{before} process(es); resuming needs the same "
                                              f"number, got {world}")


# What reading a damaged checkpoint file raises (empty, truncated, overwritten, missing).
_UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError)


def read_state(path: Path) -> Dict[str, Any]:
    """state.pt of a checkpoint; a file that cannot be read is a ConfigError naming
    --resume (before any work starts), not a traceback."""
    try:
        return torch.load(Path(path) / STATE, weights_only=False, map_location="cpu")
    except _UNREADABLE as exc:
        raise ConfigError("--resume", f"cannot read {Path(path) / STATE}: {type(exc).__name__}: "
                                      f"{exc}; the checkpoint is damaged, resume an earlier one "
                                      f"(its step-N directory)") from None


# ---------------------------------------------------------------------------- save/load
def _dcp_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_tensors(path: Path, model, optimizer) -> None:
    """Model + optimizer state via DCP (a separate function so tests can break it)."""
    import torch.distributed.checkpoint as dcp

    model_state, optim_state = _dcp_state(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))


def _rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.pt"


def _data_file(rank: int) -> str:
    return f"data-{rank:05d}.pt"


def _save_file(obj: Any, path: Path) -> None:
    """torch.save through memory, then plain file writes (report.write_saved): a full
    disk is then an OSError (ENOSPC) like every other write failure."""
    with open(path, "wb") as fh:
        write_saved(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _together(ctx, fn, main_only: bool = False) -> None:
    """Runs one step of a save (on rank 0 alone with main_only); afterwards either every
    rank goes on or every rank raises: a rank that failed alone would otherwise leave the
    others waiting in the next collective."""
    error: Optional[BaseException] = None
    if ctx.main or not main_only:
        try:
            fn()
        except BaseException as exc:   # noqa: BLE001 - handed on below, on every rank
            error = exc
    failed = ctx.any_failed(error is not None)
    if failed:
        raise error if error is not None else _OtherRankFailed(failed)


class _OtherRankFailed(OSError):
    def __init__(self, ranks):
        super().__init__(f"rank(s) {ranks} failed to write their part")


def save(run_dir: Path, *, step: int, model, optimizer, scheduler, config: Config,
         keep: int = 2, extra: Optional[Dict[str, Any]] = None, ctx=None,
         data_state: Optional[Dict[str, Any]] = None) -> Path:
    """Writes checkpoint `step` atomically and prunes to the last `keep`. On failure the
    temporary directory is removed and CheckpointError names the intact previous one.

    Under torchrun (ctx: trainer.distributed.Context) every rank calls it: each writes its
    shards through DCP and its own RNG state; rank 0 writes the rest, marks it COMPLETE and
    renames it into place once every rank's part is on disk (a shared filesystem)."""
    from trainer.distributed import SINGLE

    ctx = ctx or SINGLE
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".{final.name}{TMP}"   # one name for every rank
    old = final.parent / f".{final.name}{OLD}"

    def prepare():
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def write_parts():
        _write_tensors(tmp, model, optimizer)   # a collective under torchrun
        _save_file(rng_state(), tmp / _rng_file(ctx.rank))
        if data_state is not None:
            _save_file(data_state, tmp / _data_file(ctx.rank))

    def seal():
        state = {"step": step, "scheduler": scheduler.state_dict(),
                 "data": {"steps": step}, "world": ctx.world, "config": config.to_dict(),
                 **(extra or {})}
        _save_file(state, tmp / STATE)
        _fsync_tree(tmp)
        with open(tmp / COMPLETE, "w") as fh:   # last: marks the directory whole
            fh.write(f"{step}\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():   # the same step saved again: the old copy aside, the new one in
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
            os.rename(tmp, final)
            _fsync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)

    try:
        _together(ctx, prepare, main_only=True)
        _together(ctx, write_parts)
        _together(ctx, seal, main_only=True)
    except BaseException as exc:
        if ctx.main:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = _write_failure(exc)
        if reason is None:   # not an I/O failure (a bug, an interrupt): as it is
            raise
        previous = latest(run_dir)
        kept = (f"the previous checkpoint {previous} is intact" if previous
                else "no earlier checkpoint exists")
        raise CheckpointError(f"could not write the checkpoint of step {step} in "
                              f"{final.parent}: {reason}; {kept}") from exc
    if ctx.main:
        try:   # housekeeping: the new checkpoint is whole, and the next save prunes again
            prune(run_dir, keep)
        except OSError as exc:
            warnings.warn(f"could not prune old checkpoints in {final.parent} ({exc}); the "
                          f"new checkpoint {final} is complete, training goes on",
                          RuntimeWarning, stacklevel=2)
    return final


def _write_failure(exc: BaseException) -> Optional[str]:
    """What went wrong when `exc` is a failure to write (disk full, permissions, another
    rank's failure), else None. DCP gathers the failures of all ranks into one
    CheckpointException (a BaseException) raised on every rank."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(exc, OSError):
        return str(exc)
    if isinstance(exc, CheckpointException):
        return "; ".join(f"rank {rank}: {failure[0] if isinstance(failure, tuple) else failure}"
                         for rank, failure in sorted(exc.failures.items()))
    return None


def prune(run_dir: Path, keep: int) -> None:
    """Keeps the newest `keep` complete checkpoints; removes older ones and stale temps.
    A checkpoint is first renamed to a hidden name, then deleted: a kill part-way never
    leaves a directory that still looks complete with some of its files gone."""
    found = complete_checkpoints(run_dir)
    for old in found[:max(0, len(found) - keep)]:
        doomed = old.parent / f".{old.name}{DELETING}"
        if doomed.exists():
            shutil.rmtree(doomed, ignore_errors=True)
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    root = Path(run_dir) / DIRNAME
    for p in root.iterdir() if root.is_dir() else ():
        if p.name.startswith(f".{PREFIX}") and p.name.endswith((TMP, OLD, DELETING)):
            shutil.rmtree(p, ignore_errors=True)   # left by a killed save or prune


def load(path: Path, *, model, optimizer, scheduler, rank: int = 0) -> Dict[str, Any]:
    """Restores model, optimizer and scheduler in place (every rank of a torchrun run
    calls it); returns state.pt (step, rng of this rank, data position, config). Call
    set_rng_state(state['rng']) right before the next step. A damaged file (cut short,
    missing, overwritten) is a CheckpointError naming the checkpoint."""
    from torch.distributed.checkpoint.api import CheckpointException

    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    try:
        return _load(path, model, optimizer, scheduler, rank)
    except (CheckpointError, ConfigError, torch.OutOfMemoryError):
        raise   # out of memory is no damage: an earlier checkpoint would fail alike
    except _UNREADABLE + (CheckpointException,) as exc:   # a file gone, cut or overwritten
        # DCP's CheckpointException carries every rank's traceback: name the failures only
        reason = (_write_failure(exc) if isinstance(exc, CheckpointException)
                  else f"{type(exc).__name__}: {exc}")
        raise CheckpointError(f"{path} is damaged ({reason}); resume an earlier checkpoint "
                              f"(its step-N directory)") from exc


def _load(path: Path, model, optimizer, scheduler, rank: int) -> Dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = read_state(path)
    own_rng = path / _rng_file(rank)
    if own_rng.is_file():
        state["rng"] = torch.load(own_rng, weights_only=False)
    elif "rng" not in state:   # older checkpoints kept rank 0's RNG in state.pt too
        raise CheckpointError(f"{path} has no RNG state for rank {rank} ({own_rng.name})")
    own_data = path / _data_file(rank)   # absent in checkpoints written before it existed
    state["data_state"] = (torch.load(own_data, weights_only=False) if own_data.is_file()
                           else None)
    model_state, optim_state = _dcp_state(model, optimizer)
    # AdamW has no state for a parameter that has not had a gradient yet (e.g. the LM head
    # before the first und sample); get_state_dict makes state for every one, so ask only
    # for what was saved: the others stay stateless, exactly as in the uninterrupted run.
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    optim_state["state"] = {fqn: value for fqn, value in optim_state["state"].items()
                            if any(k.startswith(f"optim.state.{fqn}.") for k in saved)}
    target = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(target, checkpoint_id=str(path))
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    set_state_dict(model, optimizer, model_state_dict=target["model"],
                   optim_state_dict=target["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    # The loaded param groups carry the saving run's AdamW flavour (fused / foreach: an
    # older CPU run was unfused; a CPU checkpoint resumed on CUDA); this run's optimizer
    # keeps its own, or its skip-by-found_inf step would reach the unfused code.
    for group in optimizer.param_groups:
        for flag in ("fused", "foreach"):
            if flag in optimizer.defaults:
                group[flag] = optimizer.defaults[flag]
    scheduler.load_state_dict(state["scheduler"])
    # The optimizer's lr and the scheduler's last lr come back as saved, from the schedule
    # of the checkpoint's run; a resumed run may be longer (--steps grew), so its first
    # step takes the lr of ITS schedule at the restored step (the same value when the
    # schedule is unchanged: the very expression LambdaLR computes).
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs,
                                   scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return state


def describe(path: Path) -> str:
    return f"{path} (step {int(Path(path).name[len(PREFIX):])})"

