"""metrics.jsonl on a failing disk: a failed append must not stop a training run.

MetricsLog keeps the rows a write could not append and appends them, in order, at the
next write that succeeds; a line torn by the failure must not swallow the retried one.
The failures are simulated with a file object whose writes raise ENOSPC (after writing
part of the data, as a disk that fills up mid-way does), plus one real one (the run
directory removed).
"""
from __future__ import annotations

import errno
import json
import warnings

import pytest

from trainer import loop, report


def row(step):
    return {"event": "train", "step": step, "loss": 1.0 / step, "note": "x" * 40}


class _FillingDisk:
    """Wraps report.open: the next `failures` appends write half of their data, then
    raise ENOSPC; with `truncate_fails`, cutting the torn bytes off fails too (EIO)."""

    def __init__(self, monkeypatch, failures=1, truncate_fails=False):
        self.failures, self.truncate_fails = failures, truncate_fails
        self.real_open = open
        monkeypatch.setattr(report, "open", self.open, raising=False)

    def open(self, path, mode="r", *args, **kwargs):
        fh = self.real_open(path, mode, *args, **kwargs)
        return _FullFile(fh, self) if "a" in mode else fh


class _FullFile:
    def __init__(self, fh, disk):
        self.fh, self.disk = fh, disk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        if self.disk.failures > 0:
            self.disk.failures -= 1
            self.fh.write(data[:len(data) // 2])   # a torn line reaches the file
            self.fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.fh.write(data)

    def truncate(self, size=None):
        if self.disk.truncate_fails:
            raise OSError(errno.EIO, "Input/output error")
        return self.fh.truncate(size)

    def __getattr__(self, name):
        return getattr(self.fh, name)


def lines(path):
    return path.read_text().splitlines()


def test_a_full_disk_warns_and_the_next_write_appends_every_missing_row(tmp_path, monkeypatch):
    path = tmp_path / report.METRICS
    log = report.MetricsLog(path)
    log.write(row(1))
    disk = _FillingDisk(monkeypatch, failures=2)
    with pytest.warns(RuntimeWarning) as caught:
        log.write(row(2))   # no exception: the run goes on
        log.write(row(3))   # still full: no second warning for the same outage
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert str(path) in message and "No space left on device" in message, message
    assert disk.failures == 0 and log.unwritten == 2
    # what a reader sees meanwhile: whole lines only, the torn bytes were cut off
    assert [json.loads(line) for line in lines(path)] == [row(1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # recovering warns no more
        log.write(row(4))
    assert [json.loads(line) for line in lines(path)] == [row(s) for s in (1, 2, 3, 4)]
    assert log.rows == [row(s) for s in (1, 2, 3, 4)] and log.unwritten == 0


def test_a_torn_line_that_cannot_be_cut_off_does_not_swallow_the_retried_rows(tmp_path,
                                                                              monkeypatch):
    path = tmp_path / report.METRICS
    log = report.MetricsLog(path)
    log.write({"event": "eval", "when": "before", "step": 0})
    _FillingDisk(monkeypatch, failures=1, truncate_fails=True)
    with pytest.warns(RuntimeWarning, match="No space left on device"):
        log.write(row(1))
    assert not path.read_text().endswith("\n")   # the torn half line is still there
    log.write(row(2))
    text = lines(path)
    assert len(text) == 4, text   # eval, the torn line, then rows 1 and 2 on lines of their own
    assert [json.loads(line) for line in text[2:]] == [row(1), row(2)]
    # the reader a resumed run uses drops the torn line and keeps every row
    kept = loop._rows_until(path, step=2)
    assert kept == [{"event": "eval", "when": "before", "step": 0}, row(1), row(2)]


def test_a_removed_run_directory_is_survived(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = report.MetricsLog(run_dir / report.METRICS)
    log.write(row(1))
    (run_dir / report.METRICS).unlink()
    run_dir.rmdir()
    with pytest.warns(RuntimeWarning, match=str(run_dir)):
        log.write(row(2))
    run_dir.mkdir()
    log.write(row(3))
    assert [json.loads(line) for line in lines(run_dir / report.METRICS)] == [row(2), row(3)]


def test_finish_writes_what_is_missing_or_raises_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / report.METRICS
    log = report.MetricsLog(path)
    _FillingDisk(monkeypatch, failures=3)
    with pytest.warns(RuntimeWarning):
        log.write(row(1))
        log.write(row(2))
    with pytest.raises(OSError, match=r"2 metrics row\(s\) could not be appended "
                                      r"\(No space left on device\)") as err:
        log.finish()
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    log.finish()   # the disk has room again
    assert [json.loads(line) for line in lines(path)] == [row(1), row(2)]
    assert log.unwritten == 0


def test_atomic_write_errors_name_the_file(tmp_path):
    def full(fh):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / report.SUMMARY_JSON
    with pytest.raises(OSError, match=r"No space left on device: '.*summary\.json'"):
        report.atomic_write(target, full)
    assert list(tmp_path.iterdir()) == []   # neither the target nor a temporary file


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path, umask):
    # mkstemp makes 0o600 files, which os.replace carried over to summary.json,
    # checkpoint.pt and every other atomically written output
    import os
    import stat

    old = os.umask(umask)
    try:
        report.atomic_write(tmp_path / "summary.json", lambda fh: fh.write(b"{}"))
        report.atomic_write(tmp_path / "fast.png", lambda fh: fh.write(b"x"), fsync=False)
    finally:
        os.umask(old)
    for name in ("summary.json", "fast.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
