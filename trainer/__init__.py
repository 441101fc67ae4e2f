"""The consumer of unimrg_fast: UniMRG / SGT post-training of a unified multimodal model.

It uses only the public functions of unimrg_fast (no Triton code here):

    config.py      typed dataclass configuration, presets, validation (no torch import)
    scenes.py      procedural synthetic scenes, questions, prompts (the embedded data)
    tokenizers.py  word tokenizer, patch latents, k-means image codes (no downloads)
    data.py        samples of each task, packs (PackedLayout, rows per head), streams
    model.py       the UMM: Qwen2 decoder on packed attention, frozen SigLIP, projector,
                   the ar / mar / flow generation sides, one joint_loss per pack
    loop.py        train(config) -> run directory
    evaluate.py    held-out understanding accuracy and per-task losses
    report.py      metrics.jsonl, loss-curve PNG, summary, atomic checkpoints
    __main__.py    `python -m trainer`

Importing this package imports nothing heavy: `python -m trainer` must decide whether to
switch on the Triton interpreter before unimrg_fast is imported.
"""
