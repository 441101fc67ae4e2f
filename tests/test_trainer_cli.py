"""`python -m trainer`: --help, configuration from flags and files, and the promised
messages for bad configurations (exit code 2, the flag and the allowed values named,
before any work starts)."""
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.__main__ import build_parser, main, parse_config
from trainer.config import Config, ConfigError, build_config
from trainer_helpers import SMALL

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_help_explains_every_flag_recipe_and_family():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for flag in ("--fast-kernels", "--recipe", "--family", "--tasks", "--schedule",
                 "--pack-tokens", "--llm", "--vit", "--config", "--preset", "--lr", "--steps",
                 "--gradient-checkpointing", "--out"):
        assert flag in out, flag
    for word in ("unimrg", "sgt", "sft", "ar", "mar", "flow", "round-robin", "3e-3",
                 "metrics.jsonl", "loss_curves.png", "checkpoint.pt"):
        assert word in out, word
    # every flag has help text (argparse prints "--flag X" then the text)
    parser = build_parser()
    assert all(action.help for action in parser._actions)


@pytest.mark.parametrize("args, flag, allowed", [
    (["--preset", "qwen9"], "--preset", "tiny, qwen2.5-0.5b, qwen2.5-1.5b"),
    (["--family", "vae"], "--family", "ar, mar, flow"),
    (["--recipe", "dpo"], "--recipe", "unimrg, sgt, sft"),
    (["--tasks", "und,normals"], "--tasks", "und, pixel, depth, seg"),
    (["--schedule", "random"], "--schedule", "interleaved, round-robin"),
    (["--pack-tokens", "100"], "--pack-tokens", "use --pack-tokens >= 144"),
    (["--num-heads", "3"], "--num-heads", "multiple of --num-kv-heads"),
    (["--warmup", "1.5"], "--warmup", "[0.0, 1.0)"),
    (["--betas", "0.9"], "--betas", "two numbers in [0, 1)"),
    (["--betas", "0.9,abc"], "--betas", "two numbers in [0, 1)"),
    (["--llm", "/no/such/dir"], "--llm", "no such directory"),
    (["--device", "tpu"], "--device", "auto, cpu, cuda"),
    (["--max-skipped-steps", "-1"], "--max-skipped-steps", "an int >= 0"),
    # NaN passed every "x >= 0" check and trained to NaN weights; inf as well
    (["--lr", "inf"], "--lr", "must be a finite number, got inf"),
    (["--weight-decay", "nan"], "--weight-decay", "must be a finite number, got nan"),
    (["--grad-clip", "nan"], "--grad-clip", "must be a finite number, got nan"),
    (["--rope-theta", "inf"], "--rope-theta", "must be a finite number, got inf"),
    (["--head-dim", "7"], "--head-dim", "must be even"),
    (["--preset", ""], "--preset", "unknown value ''"),
    (["--images", "/tmp"], "--images", "only used with --data"),
    (["--num-workers", "2"], "--num-workers", "only used with --data"),
], ids=lambda v: v if isinstance(v, str) and v.startswith("--") else None)
def test_bad_values_exit_2_naming_the_flag_and_the_allowed_values(args, flag, allowed, capsys):
    with pytest.raises(SystemExit) as info:
        main(args + ["--out", "/nonexistent/never-created"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and allowed in err, err
    assert not Path("/nonexistent/never-created").exists()


def test_bad_value_from_the_command_line_subprocess(tmp_path):
    result = _run("--family", "vae", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "--family" in result.stderr and "ar, mar, flow" in result.stderr
    assert not list(tmp_path.iterdir()), "a run directory was created for a bad config"


def test_out_at_or_under_a_file_exits_2_naming_out(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    for out in (blocker, blocker / "runs"):
        with pytest.raises(SystemExit) as info:
            main(["--out", str(out)])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "--out" in err and str(blocker) in err and "not a directory" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_config_file_then_flags_override_the_preset(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("family: ar\noptim:\n  lr: 0.01\n  steps: 7\ndata:\n  tasks: und,seg\n")
    config = parse_config(["--config", str(yaml_file), "--steps", "9"], build_parser())
    assert config.model.family == "ar" and config.optim.lr == 0.01 and config.optim.steps == 9
    assert config.data.tasks == ("und", "seg") and config.preset == "tiny"
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('recipe = "sgt"\n[run]\nlog_every = 3\n')
    config = parse_config(["--config", str(toml_file)], build_parser())
    assert config.data.recipe == "sgt" and config.run.log_every == 3 and config.data.seg_colour


def test_an_empty_out_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)   # '' was the working directory: the run landed there
    with pytest.raises(SystemExit) as info:
        main(["--out", ""])
    assert info.value.code == 2
    assert "--out: must be a non-empty string" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_yaml_numbers_in_exponent_form_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as text; the --help example writes lr that way
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("optim:\n  lr: 1e-4\nweight_decay: 2E-2\nrope_theta: 1.0e+6\n")
    config = parse_config(["--config", str(yaml_file)], build_parser())
    assert (config.optim.lr, config.optim.weight_decay, config.model.rope_theta) == \
        (1e-4, 2e-2, 1e6)


@pytest.mark.parametrize("text, flag, message", [
    ('shuffle: "false"\n', "--shuffle", "must be true or false, got 'false'"),
    ('fast_kernels: "yes"\n', "--fast-kernels", "must be true or false, got 'yes'"),
    ("seed: 1.5\n", "--seed", "must be an integer, got 1.5"),
    ("weight_decay: .nan\n", "--weight-decay", "must be a finite number, got nan"),
    ("name: 5\n", "--name", "must be a non-empty string, got 5"),
    ("out: null\n", "--out", "must be a non-empty string, got None"),
    ("vit: null\n", "--vit", "must be a non-empty string, got None"),
    ("tasks: 5\n", "--tasks", "must be a comma-separated list of tasks"),
    ("betas: 0.9\n", "--betas", "must be two numbers in [0, 1)"),
    ("run:\n  preset: qwen2.5-0.5b\n", "--preset", "belongs at the top level"),
    ("grad_clip: 0.5\ngrad-clip: 0.7\n", "--grad-clip", "set twice (0.5 and 0.7)"),
    ("optim:\n  lr: 0.1\nlr: 0.2\n", "--lr", "set twice"),
])
def test_config_file_values_of_the_wrong_kind_name_their_setting(tmp_path, capsys, monkeypatch,
                                                                 text, flag, message):
    monkeypatch.chdir(tmp_path)   # no --out: a flag would override the file's own
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as info:
        main(["--config", str(bad)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and message in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]


def test_a_flag_overrides_a_nested_config_value(tmp_path):
    nested = tmp_path / "run.yaml"
    nested.write_text("optim:\n  lr: 0.1\n")
    assert parse_config(["--config", str(nested), "--lr", "0.2"], build_parser()).optim.lr == 0.2


def test_a_resume_matches_paths_as_typed_or_by_the_place_they_name(tmp_path, monkeypatch):
    from trainer.checkpoint import config_differences

    (tmp_path / "a" / "llm").mkdir(parents=True)
    (tmp_path / "b" / "llm").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    saved = build_config("tiny", {"llm": "llm"}).to_dict()
    # the same files named absolute: the same place
    assert config_differences(saved, build_config("tiny", {"llm": str(tmp_path / "a" / "llm")})) == []
    # the run tree moved (or resumed from a copy): as typed is enough
    monkeypatch.chdir(tmp_path / "b")
    assert config_differences(saved, build_config("tiny", {"llm": "llm"})) == []
    assert config_differences(saved, build_config("tiny", {"llm": str(tmp_path / "b")})) != []


def test_an_older_runs_ignored_settings_do_not_block_its_resume(tmp_path):
    from trainer.checkpoint import config_differences

    # --num-workers 2 on a synthetic run was accepted (and ignored) before it was refused
    saved = build_config("tiny", {}).to_dict()
    saved["data"]["num_workers"] = 2
    assert config_differences(saved, build_config("tiny", {})) == []
    assert Config.from_dict(saved).data.num_workers == 0


def test_a_float_setting_past_floats_range_names_its_flag(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("rope_theta: 1" + "0" * 400 + "\n")
    with pytest.raises(SystemExit) as info:
        main(["--config", str(big)])
    assert info.value.code == 2 and "--rope-theta: must be a finite number" in capsys.readouterr().err


def test_unknown_setting_in_a_config_file_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    with pytest.raises(SystemExit) as info:
        main(["--config", str(bad)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "lr" in err


def test_presets_are_functions_returning_valid_configs():
    tiny = build_config("tiny")
    assert tiny.optim.lr == 3e-3 and tiny.model.hidden_size == 64
    for name, hidden in (("qwen2.5-0.5b", 896), ("qwen2.5-1.5b", 1536)):
        config = build_config(name)
        assert config.model.hidden_size == hidden and config.optim.lr == 1e-5
        assert config.optim.betas == (0.9, 0.95) and config.optim.weight_decay == 0.02
        assert config.optim.grad_clip == 1.0 and config.model.vocab_size == 151_936
    with pytest.raises(ConfigError, match="--preset"):
        build_config("gpt")


def test_a_run_prints_the_run_directory_last(tmp_path, capsys):
    args = []
    for key, value in {**SMALL, "steps": 3}.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else ["--no-" + flag[2:]] if value is False else [flag, str(value)]
    assert main(args + ["--out", str(tmp_path), "--fast-kernels", "--eval-questions", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("run directory: ")
    run_dir = Path(lines[-1].split(": ", 1)[1])
    assert run_dir.parent == tmp_path and (run_dir / "summary.txt").exists()
    assert sum("Triton interpreter" in line for line in lines) <= 1


def test_fast_kernels_where_triton_cannot_run_exit_2_with_the_reason(tmp_path, monkeypatch,
                                                                    capsys):
    from unimrg_fast import backends

    # e.g. Triton 3.6's interpreter under numpy 2.4: every kernel would fail inside it
    broken = backends.Probe(False, "3.6.0", "Triton 3.6.0's interpreter cannot run under "
                                            "numpy 2.4.6; pip install 'numpy<2.4'")
    monkeypatch.setattr(backends, "triton", lambda: broken)
    with pytest.raises(SystemExit) as info:
        main(["--preset", "tiny", "--steps", "1", "--out", str(tmp_path), "--fast-kernels"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--fast-kernels: the Triton kernels cannot run here" in err and "numpy<2.4" in err
    assert not list(tmp_path.iterdir()), "refused before any run directory was made"


def test_estimate_on_the_tiny_preset_prints_both_projections():
    result = _run("--estimate", "--preset", "tiny", "--recipe", "unimrg-harmon-1.5b",
                  "--gpus", "8", "--samples-per-gpu", "4", "--warmup-steps", "1",
                  "--timed-steps", "1", timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "fast (" in out and "plain (PyTorch reference)" in out, out
    assert out.count("projected") == 2 and "10,000 iterations" in out, out
    assert "ms all-reduce" in out and "3-8 h" in out and "not modelled" in out, out


def test_estimate_unknown_recipe_exits_2_naming_the_allowed_values(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--estimate", "--recipe", "harmon-7b"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--recipe" in err and "unimrg-harmon-1.5b, unimrg-harmon-0.5b" in err, err
