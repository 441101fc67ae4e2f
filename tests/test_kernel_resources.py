"""GPU resources of the Triton kernels, checked without a GPU.

A kernel whose tiles need more shared memory than a block may have compiles fine and
fails only at launch (OutOfResources), so neither the CPU lane (the interpreter) nor a
review of the code catches it. Triton compiles for a GPU target offline with its own
bundled ptxas: these tests compile the packed-attention kernels for sm_90 at the tile
configurations `_pick_config` gives an H100 / H200 and read the shared memory off the
compiled kernels. Only the configurations closest to the limit are compiled (a few
seconds each), in a subprocess, since the CPU lane's TRITON_INTERPRET replaces every
kernel with its interpreted twin.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (dtype, head dim): the H100 choices that need the most shared memory (fp32 carries
# tf32x3 dots; D = 256 the widest tiles).
CASES = [("float32", 256), ("float32", 128), ("bfloat16", 256)]

_SCRIPT = r"""
import importlib, json, sys, warnings
warnings.filterwarnings("ignore")
import torch, triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print(json.dumps({"skip": f"this Triton has no offline compile API: {exc}"}))
    sys.exit(0)
A = importlib.import_module("unimrg_fast.ops.packed_attention")
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
out = []
for dtype_name, head_dim in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype_name)
    block_d = max(16, triton.next_power_of_2(head_dim))
    cfg = A._pick_config(dtype, block_d, False, 32768)
    budget = dict(A._LADDERS[(dtype == torch.float32, max(64, block_d))])[cfg]
    for name, kern, bm, bn, warps, stages in (
            ("fwd", A._attn_fwd_kernel, cfg.fwd_block_m, cfg.fwd_block_n, cfg.fwd_warps,
             cfg.fwd_stages),
            ("dq", A._attn_bwd_dq_kernel, cfg.fwd_block_m, cfg.fwd_block_n, cfg.dq_warps,
             cfg.dq_stages),
            ("dkdv", A._attn_bwd_dkdv_kernel, cfg.kv_block_m, cfg.kv_block_n, cfg.kv_warps,
             cfg.kv_stages)):
        constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, HEAD_DIM=head_dim,
                          UPCAST=False, PRECISION=A._precision(dtype, False))
        sig = {}
        for arg in kern.arg_names:
            if arg in constexprs:
                sig[arg] = "constexpr"
            elif arg in A._LAYOUT_ARGS and arg != "T":
                sig[arg] = "*i32"
            elif arg in ("lse_ptr", "delta_ptr", "dlse_ptr"):
                sig[arg] = "*fp32"
            elif arg.endswith("_ptr"):
                sig[arg] = "*" + TYPES[dtype]
            elif arg in ("qk_scale", "sm_scale"):
                sig[arg] = "fp32"
            else:
                sig[arg] = "i32"
        compiled = triton.compile(ASTSource(kern, sig, constexprs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=warps, num_stages=stages))
        out.append(dict(case=f"{dtype_name} D={head_dim} {name} {cfg}",
                        shared=compiled.metadata.shared, budget=budget))
print(json.dumps({"kernels": out}))
"""


def test_packed_attention_fits_h100_shared_memory():
    pa = pytest.importorskip("unimrg_fast.ops.packed_attention")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    run = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(CASES)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"offline compile failed:\n{run.stderr[-4000:]}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert len(result["kernels"]) == 3 * len(CASES)
    for kernel in result["kernels"]:
        assert kernel["shared"] <= pa.SMEM_SM90, (
            f"{kernel['case']}: {kernel['shared']} B of shared memory > an H100's "
            f"{pa.SMEM_SM90} B per block: it cannot launch")
        # _pick_config trusts the recorded budget to choose for smaller GPUs
        assert kernel["shared"] <= kernel["budget"], (
            f"{kernel['case']}: {kernel['shared']} B > its recorded {kernel['budget']} B "
            f"in _LADDERS: update the table")
