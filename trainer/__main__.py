"""`python -m trainer`: the command line of the post-training job.

Today only the command line exists: the trainer itself (issue #5) is not built yet, so
every run that is not --help stops with a message that says so, before doing any work.
"""
from __future__ import annotations

import argparse
import sys

COMING = """\
The trainer is not built yet (issue #5). When it lands, `python -m trainer --fast-kernels`
post-trains a tiny unified multimodal model on embedded synthetic scenes with UniMRG's
four tasks (understanding, pixel, depth and segmentation generation) on a 2-core CPU in
under 3 minutes; without --fast-kernels the same model runs the plain PyTorch path.
What exists today: the reference ops and the packed layout (import unimrg_fast)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="UniMRG / SGT post-training of a unified multimodal model.",
        epilog=COMING, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast-kernels", action="store_true",
                        help="use the fused Triton kernels (impl='triton') for attention and "
                             "losses; without it every op runs the plain PyTorch reference")
    parser.add_argument("--recipe", default="unimrg", choices=("unimrg", "sgt", "sft"),
                        help="unimrg: und + pixel + depth + seg, weights 1; sgt: seg + und at "
                             "2:1; sft: understanding only (the paper's baseline)")
    parser.add_argument("--family", default="mar", choices=("ar", "mar", "flow"),
                        help="generation side: ar (codebook CE), mar (DDPM eps-prediction), "
                             "flow (flow matching)")
    return parser


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    print(COMING, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
