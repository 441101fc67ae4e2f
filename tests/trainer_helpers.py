"""Shared by the trainer tests: a model and packs far smaller than the tiny preset (16-px
scenes, one decoder layer, 256-token packs), so a run takes a second on the reference
path and a few on the Triton interpreter."""
import json
from pathlib import Path

from trainer.config import build_config

SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
             intermediate_size=64, vit_hidden_size=16, vit_heads=2, image_size=16, patch=4,
             vit_patch=4, latent_channels=8, num_codes=16, diffusion_layers=1,
             pack_tokens=256, questions_per_image=1, eval_questions=4, eval_scenes=1,
             steps=12, lr=1e-2, warmup=0.1, log_every=1, progress=False)


def small_config(tmp_path, **overrides):
    return build_config("tiny", {**SMALL, "out": str(tmp_path), **overrides})


def train_rows(run_dir: Path):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == "train"]


DECODER_OPS = ("rms_norm", "swiglu", "rotary")


def count_kernel_calls(monkeypatch, ops=DECODER_OPS + ("packed_attention",)):
    """{op: calls of unimrg_fast.ops.<op>._triton} from now on, for the ops named."""
    import importlib

    from unimrg_fast import backends

    calls = dict.fromkeys(ops, 0)
    for name in ops:
        module = importlib.import_module(f"unimrg_fast.ops.{name}")

        def spy(*a, _real=module._triton, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(module, "_triton", spy)
    monkeypatch.setattr(backends, "_loaded", {})   # resolve loads the spies, then forgets them
    return calls
