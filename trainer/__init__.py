"""The consumer of unimrg_fast: UniMRG / SGT post-training of a unified multimodal model.

It uses only the public functions of unimrg_fast (no Triton code here). The full
trainer (model families, embedded synthetic data, recipes, loop) is issue #5.
"""
