"""README.md's usage snippet runs as written, and its test command is what CI runs."""
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
