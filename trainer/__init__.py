"""The consumer of unimrg_fast: UniMRG / SGT post-training of a unified multimodal model.

It uses only the public functions of unimrg_fast (no Triton code here):

    config.py      typed dataclass configuration, presets, validation (no torch import)
    scenes.py      procedural synthetic scenes, questions, prompts (the embedded data)
    tokenizers.py  word tokenizer, patch latents, k-means image codes (no downloads)
    data.py        samples of each task, packs (PackedLayout, rows per head), streams
    model.py       the UMM: Qwen2 decoder on packed attention, frozen SigLIP, projector,
                   the ar / mar / flow generation sides, one joint_loss per pack
    loop.py        train(config) -> run directory: one loop for one process and torchrun
    distributed.py torchrun: process group, DDP / FSDP2 wrapping, the data split, counts
    checkpoint.py  resumable checkpoints (DCP, atomic, every rank's part), --resume
    telemetry.py   GPU readings, MFU, TensorBoard
    realdata.py    LLaVA-format records and their image / depth / mask folders (--data)
    datapaths.py   where those folders are (the UniMRG release layout)
    prepare.py     `python -m trainer.prepare`: depth and segmentation targets by teachers
    teachers.py    Depth Anything V2 and SAM automatic masks through transformers
    estimate.py    `python -m trainer --estimate`: the recipe's projected wall-clock
    evaluate.py    held-out understanding accuracy and per-task losses
    report.py      metrics.jsonl, loss-curve PNG, summary, the exported weights
    __main__.py    `python -m trainer`

Importing this package imports nothing heavy: `python -m trainer` must decide whether to
switch on the Triton interpreter before unimrg_fast is imported.
"""
