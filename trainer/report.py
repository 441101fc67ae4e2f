"""What a run leaves in its directory: metrics.jsonl, loss_curves.png, summary.{txt,json},
checkpoint.pt, config.yaml. Every file is written so that a crash never leaves a corrupt
one: the metrics file is appended and flushed line by line, the others are written to a
temporary file that then replaces the target (os.replace is atomic)."""
from __future__ import annotations

import datetime
import io
import json
import os
import tempfile
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
    path, n = parent / name, 1
    while path.exists():  # two runs in one second: never reuse a directory
        n += 1
        path = parent / f"{name}-{n}"
    path.mkdir(parents=True)
    return path


def atomic_write(path: Path, write) -> None:
    """Calls write(file object) on a temporary file next to `path`, then replaces it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_config(run_dir: Path, config: Config) -> None:
    import yaml

    text = yaml.safe_dump(_plain(config.to_dict()), sort_keys=False)
    atomic_write(run_dir / CONFIG, lambda fh: fh.write(text.encode()))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_checkpoint(run_dir: Path, model, config: Config, step: int, image_tokenizer,
                    name: str = CHECKPOINT) -> Path:
    """Trainable state (everything but the frozen ViT) + config + step, atomically."""
    state = {"step": step, "config": config.to_dict(),
             "model": {k: v.detach().cpu() for k, v in model.trainable_state_dict().items()}}
    if hasattr(image_tokenizer, "state_dict"):
        state["image_tokenizer"] = image_tokenizer.state_dict()
    buffer = io.BytesIO()   # through memory: a full disk is then a plain OSError (ENOSPC)
    torch.save(state, buffer)
    path = run_dir / name
    atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))
    return path


class MetricsLog:
    """JSON lines, one per log step or event, flushed as written."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: List[Dict[str, Any]] = []

    def write(self, row: Dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()


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
