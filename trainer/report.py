"""What a run leaves in its directory: metrics.jsonl, loss_curves.png, summary.{txt,json},
checkpoint.pt, config.yaml. Every file is written so that a crash never leaves a corrupt
one: the metrics file is appended and flushed line by line (a failed append is retried,
see MetricsLog), the others are written to a temporary file that then replaces the
target (os.replace is atomic)."""
from __future__ import annotations

import datetime
import errno
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from trainer.config import TASKS, Config

METRICS, CURVES, SUMMARY_TXT, SUMMARY_JSON = ("metrics.jsonl", "loss_curves.png",
                                              "summary.txt", "summary.json")
CHECKPOINT, CONFIG = "checkpoint.pt", "config.yaml"


def make_run_dir(config: Config) -> Path:
    parent = Path(config.run.out)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = config.run.name or f"{stamp}-{config.data.recipe}-{config.model.family}"
    parent.mkdir(parents=True, exist_ok=True)
    path, n = parent / name, 1
    while True:   # two runs in one second: never reuse a directory; mkdir is the test
        try:      # (checking exists() first raced with another run's mkdir)
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            path = parent / f"{name}-{n}"


def atomic_write(path: Path, write, *, fsync: bool = True) -> None:
    """Calls write(file object) on a temporary file next to `path`, then replaces it
    (os.replace is atomic: an interrupted run leaves the whole file or the old one),
    with the mode a plain open() would give. An OSError names `path` (a write to the
    open file, e.g. ENOSPC, names no file). fsync=False: no wait for the disk, for
    files a later run can make again."""
    try:
        # a short name of its own: `.{path.name}...` overran NAME_MAX (255) for long names
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".atomic-", suffix=".tmp")
    except OSError as exc:
        raise _naming(exc, path)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _naming(exc, path)
        raise


def write_saved(obj: Any, fh) -> None:
    """torch.save(obj) into the open file `fh` through memory: torch.save to a file
    reports a full disk as a RuntimeError of its zip writer, a plain write as an OSError
    (ENOSPC) like every other write failure.

    The view of the buffer is released even when the write fails: the failure's
    traceback would otherwise keep it with the BytesIO in a reference cycle, and CPython
    3.12.0 / 3.12.1 crash (SIGSEGV) collecting that cycle (python/cpython#111049; seen in
    the checkpoint disk-full tests on 3.12.1)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with buffer.getbuffer() as view:
        fh.write(view)


def new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the umask. mkstemp makes its files
    0o600 (owner only), which os.replace would carry over to every target. The umask is
    read from /proc where there is one: os.umask can only read it by setting it, which
    races with the I/O threads creating files."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _naming(exc: OSError, path: Path) -> OSError:
    """`exc` with `path` as its file name where it has none: str() then reads
    "[Errno 28] No space left on device: '.../summary.json'"."""
    if exc.filename is None:
        exc.filename = str(path)
    return exc


def write_config(run_dir: Path, config: Config) -> None:
    """config.yaml: the run's settings, such that `--config config.yaml` starts a FRESH
    run of the same kind: --resume / --resume-dir are left out (they would resume, and
    abandon, this run's checkpoints)."""
    import yaml

    values = _plain(config.to_dict())
    values["run"].update(resume=None, resume_dir=None)
    text = yaml.safe_dump(values, sort_keys=False)
    atomic_write(run_dir / CONFIG, lambda fh: fh.write(text.encode()))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_checkpoint(run_dir: Path, weights: Dict[str, Any], config: Config,
                    step: int, image_tokenizer, name: str = CHECKPOINT) -> Path:
    """The trainable weights (distributed.full_trainable_state: everything but the frozen
    ViT) + config + step, atomically."""
    state = {"step": step, "config": config.to_dict(), "model": dict(weights)}
    if hasattr(image_tokenizer, "state_dict"):
        state["image_tokenizer"] = image_tokenizer.state_dict()
    path = run_dir / name
    atomic_write(path, lambda fh: write_saved(state, fh))
    return path


class MetricsLog:
    """JSON lines, one per log step or event, flushed as written.

    A failed append (a full disk, EIO, the run directory removed) does not stop the run:
    the model is fine and checkpoints handle their own failures. The row stays in
    `rows` and in a backlog; a warning names the file and the error (once per outage);
    every later write appends the whole backlog first, in order, so the file is complete
    again once the disk has room. `finish()` at the end of a run makes a last attempt.
    """

    def __init__(self, path: Path):
        self.path = path
        self.rows: List[Dict[str, Any]] = []
        self._backlog: List[str] = []   # lines not in the file yet, oldest first
        self._failing = False           # an outage was warned about and not yet over

    @property
    def unwritten(self) -> int:
        """How many rows have not reached the file yet."""
        return len(self._backlog)

    def write(self, row: Dict[str, Any]) -> None:
        self.rows.append(row)
        self._backlog.append(json.dumps(row) + "\n")
        self._drain()

    def finish(self) -> None:
        """Appends what is still missing; raises OSError (naming the file and how many
        rows it lacks) if that fails again. The rows stay in `rows` either way."""
        exc = self._drain() if self._backlog else None
        if exc is not None:
            raise OSError(exc.errno, f"{self.unwritten} metrics row(s) could not be appended "
                                     f"({exc.strerror or exc})", str(self.path)) from exc

    def _drain(self) -> Optional[OSError]:
        try:
            append_lines(self.path, "".join(self._backlog))
        except OSError as exc:
            if not self._failing:
                warnings.warn(f"could not append to {self.path}: {exc}; training goes on, and "
                              f"the missing rows are appended at the next write that "
                              f"succeeds", RuntimeWarning, stacklevel=3)
            self._failing = True
            return exc
        self._backlog.clear()
        self._failing = False
        return None


def append_lines(path: Path, text: str) -> None:
    """Appends `text` (whole lines) to `path` so that a failure leaves no torn line for
    readers to glue the next line onto: the file is cut back to its size before the
    append, and where even that failed earlier (the torn line is still there), the text
    starts on a fresh line, so readers that skip a broken line lose only that one."""
    data = text.encode()
    # unbuffered: a failed write leaves no bytes behind in a buffer that close() flushes
    # after the truncate
    with open(path, "a+b", buffering=0) as fh:
        size = fh.seek(0, os.SEEK_END)
        if size:
            fh.seek(size - 1)
            if fh.read(1) != b"\n":
                data = b"\n" + data
        try:
            view = memoryview(data)
            while view:   # a raw write may be short (the disk filled up mid-way)
                written = fh.write(view)
                if not written:
                    raise OSError(errno.EIO, "nothing written", str(path))
                view = view[written:]
        except OSError:
            try:
                fh.truncate(size)
            except OSError:
                pass      # the next append starts on a fresh line instead
            raise


def plot_losses(rows: List[Dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    train = [r for r in rows if r.get("event") == "train"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for task in TASKS:
        points = [(r["step"], r[f"loss/{task}"]) for r in train if r.get(f"loss/{task}") is not None]
        if points:
            ax.plot(*zip(*points), label=task, marker="." if len(points) < 40 else None)
    points = [(r["step"], r["loss"]) for r in train if r.get("loss") is not None]
    if points:
        ax.plot(*zip(*points), label="total", color="black", linewidth=1.0, linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (per task, mean over log interval)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary(config: Config, rows: List[Dict[str, Any]], before: Dict[str, Any],
            after: Dict[str, Any], wall_s: float, impl: str) -> Dict[str, Any]:
    train = [r for r in rows if r.get("event") == "train"]
    first, last = (train[0], train[-1]) if train else ({}, {})
    tasks = [t for t in TASKS if t in config.data.active_tasks]
    return {
        "preset": config.preset, "family": config.model.family, "recipe": config.data.recipe,
        "tasks": tasks, "schedule": config.data.schedule, "impl": impl,
        "steps": last.get("step", 0), "wall_s": wall_s,
        "tokens_per_s": (sum(r["tokens"] for r in train) / sum(r["interval_s"] for r in train)
                         if train and sum(r["interval_s"] for r in train) > 0 else None),
        "train_loss_first": {t: first.get(f"loss/{t}") for t in tasks},
        "train_loss_last": {t: last.get(f"loss/{t}") for t in tasks},
        "eval_before": before, "eval_after": after,
    }


def summary_table(s: Dict[str, Any]) -> str:
    lines = [f"UniMRG post-training: preset {s['preset']}, family {s['family']}, recipe "
             f"{s['recipe']} ({', '.join(s['tasks'])}), schedule {s['schedule']}, "
             f"kernels {s['impl']}",
             f"{s['steps']} steps in {s['wall_s']:.1f} s, "
             f"{_fmt(s['tokens_per_s'], 0)} tokens/s in training steps", "",
             f"{'task':<8} {'train first':>12} {'train last':>12} {'held-out before':>16} "
             f"{'held-out after':>15}"]
    b, a = s["eval_before"] or {}, s["eval_after"] or {}
    for t in s["tasks"]:
        lines.append(f"{t:<8} {_fmt(s['train_loss_first'].get(t)):>12} "
                     f"{_fmt(s['train_loss_last'].get(t)):>12} "
                     f"{_fmt(b.get(f'loss/{t}')):>16} {_fmt(a.get(f'loss/{t}')):>15}")
    if b.get("und_accuracy") is not None or a.get("und_accuracy") is not None:
        questions = b.get("und_questions", a.get("und_questions"))
        lines += ["", f"understanding accuracy on {questions} held-out questions "
                      f"(greedy decoding): {_pct(b.get('und_accuracy'))} before -> "
                      f"{_pct(a.get('und_accuracy'))} after"]
        before_kinds, after_kinds = (b.get("und_accuracy_by_kind") or {},
                                     a.get("und_accuracy_by_kind") or {})
        kinds = sorted(set(before_kinds) | set(after_kinds))
        if kinds:
            lines.append("  by kind: " + ", ".join(
                f"{k} {_pct(before_kinds.get(k), 0)} -> {_pct(after_kinds.get(k), 0)}"
                for k in kinds))
    return "\n".join(lines)


def _pct(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}%}"


def write_summary(run_dir: Path, s: Dict[str, Any]) -> str:
    table = summary_table(s)
    atomic_write(run_dir / SUMMARY_JSON, lambda fh: fh.write(json.dumps(s, indent=2).encode()))
    atomic_write(run_dir / SUMMARY_TXT, lambda fh: fh.write((table + "\n").encode()))
    return table
