"""`python -m trainer` until the trainer lands (issue #5): --help works and says what is coming."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_help_explains_the_flags_and_what_is_coming():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    assert "--fast-kernels" in result.stdout and "issue #5" in result.stdout


def test_a_run_says_the_trainer_is_not_built_yet():
    result = _run("--fast-kernels")
    assert result.returncode == 2 and "not built yet" in result.stderr


def test_unknown_recipe_names_the_allowed_values():
    result = _run("--recipe", "dpo")
    assert result.returncode == 2 and "unimrg" in result.stderr and "--recipe" in result.stderr
