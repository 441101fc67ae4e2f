"""README.md's usage snippet runs as written, and its test command is what CI runs."""
import os
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_usage_snippet_runs():
    snippet = re.search(r"## Use\n\n```python\n(.*?)```", README, re.S).group(1)
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["out"].shape == (4096, 12, 64)
    assert torch.isfinite(scope["out"]).all()
    assert scope["loss"].dim() == 0 and torch.isfinite(scope["loss"])


def test_ci_runs_the_readme_test_command():
    block = re.search(r"<!-- test-command -->\n```bash\n(.*?)\n```\n<!-- /test-command -->", README, re.S)
    assert block is not None, "README.md must keep its test command between the markers"
    assert "pytest tests" in block.group(1) and "pytest benchmarks --benchmark-only" in block.group(1)
    assert "test-command" in (ROOT / ".ci" / "run").read_text()


def test_gpu_session_runs_several_slices_and_a_failed_command_fails_its_slice(tmp_path):
    """Several slices in one command (one machine start): each logs on its own, a slice
    stops at its first failed command (the trainer slice runs three), the next slice still
    runs, and the command exits 1 naming the failed ones. Python is a stub here: it logs
    its arguments and fails the first trainer run."""
    import subprocess

    calls = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text("#!/usr/bin/env bash\n"
                    f'echo "$*" >> {calls}\n'
                    'if [ "$1 $2" = "-m trainer" ] && [ "$3" = "--fast-kernels" ]; then exit 3; fi\n')
    stub.chmod(0o755)
    logs = tmp_path / "logs"
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "trainer,estimate",
                          str(logs)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHON": str(stub)})
    assert run.returncode == 1, run.stdout + run.stderr
    assert "failed slices: trainer" in run.stdout
    lines = calls.read_text().splitlines()
    trainer_runs = [line for line in lines if "trainer" in line and "torch.distributed" in line]
    assert trainer_runs == []  # the slice stopped at its failed first command
    assert any("--estimate" in line for line in lines)  # the next slice ran
    assert sum("setup.py" in line for line in lines) == 1  # one build for both
    log = (logs / "gpu-session.log").read_text()
    assert "slice trainer FAILED (exit 3)" in log and "slice estimate took" in log


def test_gpu_session_every_slice_returns_its_files_even_after_a_failed_row(tmp_path):
    """The device tool returns at most 8 files from $OUT: every slice in one command
    leaves fewer (one log, the JSONs, the trainer summary). A benchmark slice whose
    pytest fails (a row failed) still copies out the JSON of the rows that ran, and the
    attention slice leaves the flex rows out unless BENCH_K says otherwise."""
    import shutil
    import subprocess

    repo, calls, logs = tmp_path / "repo", tmp_path / "calls.txt", tmp_path / "out"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "gpu_session.sh", repo / "benchmarks")
    stub = tmp_path / "python"
    stub.write_text("#!/usr/bin/env bash\n"
                    f'echo "$*" >> {calls}\n'
                    'args=("$@"); out=; name=\n'
                    'for ((i = 0; i < $#; i++)); do case "${args[$i]}" in\n'
                    '  --results-save) mkdir -p benchmarks/results;'
                    ' echo "{}" > "benchmarks/results/${args[$((i + 1))]}.json" ;;\n'
                    '  --out) out=${args[$((i + 1))]} ;;\n'
                    '  --name) name=${args[$((i + 1))]} ;;\n'
                    'esac; done\n'
                    'if [ -n "$out" ] && [ -n "$name" ]; then mkdir -p "$out/$name";'
                    ' echo done > "$out/$name/summary.txt"; fi\n'
                    'case "$*" in *test_bench_losses.py*) exit 1 ;; esac\n')
    stub.chmod(0o755)
    every = "tests,losses,attention,decoder,train-step,trainer,estimate,probe"
    env = {k: v for k, v in os.environ.items() if k != "BENCH_K"}
    run = subprocess.run(["bash", "benchmarks/gpu_session.sh", every, str(logs)], cwd=repo,
                         capture_output=True, text=True,
                         env={**env, "PYTHON": str(stub), "RESULTS_TAG": "t"})
    assert run.returncode == 1 and "failed slices: losses" in run.stdout, run.stdout + run.stderr
    files = sorted(p.name for p in logs.iterdir())
    assert len(files) <= 8, files
    assert {"gpu-session.log", "t-losses.json", "t-attention.json", "t-decoder.json",
            "t-train-step.json", "trainer-summary.txt"} <= set(files), files
    lines = calls.read_text().splitlines()
    attention = [line for line in lines if "test_bench_attention.py" in line]
    assert attention and "-k not flex" in attention[0], attention
    assert not any("-k" in line.split() for line in lines if "test_bench_losses.py" in line)
    calls.unlink()
    subprocess.run(["bash", "benchmarks/gpu_session.sh", "attention", str(logs)], cwd=repo,
                   capture_output=True, text=True, check=True,
                   env={**env, "PYTHON": str(stub), "RESULTS_TAG": "t", "BENCH_K": ""})
    assert "-k" not in [w for line in calls.read_text().splitlines() if "pytest" in line
                        for w in line.split()]
    # a pytest that dies before writing its JSON: an older file of that name (a committed
    # one, the same day's tag) must not come back as this run's figures
    (repo / "benchmarks" / "results" / "t-losses.json").write_text('{"saved_at": "OLD"}')
    dying = tmp_path / "dying-python"
    dying.write_text("#!/usr/bin/env bash\ncase \"$*\" in *pytest*) exit 2 ;; esac\n")
    dying.chmod(0o755)
    fresh = tmp_path / "fresh-out"
    run = subprocess.run(["bash", "benchmarks/gpu_session.sh", "losses", str(fresh)], cwd=repo,
                         capture_output=True, text=True,
                         env={**env, "PYTHON": str(dying), "RESULTS_TAG": "t"})
    assert run.returncode == 1 and not (fresh / "t-losses.json").exists()


def test_gpu_session_script_parses_and_names_its_slices():
    """benchmarks/gpu_session.sh (what a session with a GPU runs, README Results): valid
    bash, every slice the README names is known, a wrong one exits 2 listing them."""
    import subprocess

    script = ROOT / "benchmarks" / "gpu_session.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    bad = subprocess.run(["bash", str(script), "no-such-slice"], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2
    readme = (ROOT / "README.md").read_text()
    for slice_name in ("tests", "losses", "attention", "train-step", "trainer", "estimate",
                       "probe"):
        assert slice_name in bad.stderr
        assert f"gpu_session.sh {slice_name}" in readme, slice_name
