"""GPU resources of the Triton kernels, checked without a GPU.

A kernel whose tiles need more shared memory than a block may have compiles fine and
fails only at launch (OutOfResources), so neither the CPU lane (the interpreter) nor a
review of the code catches it. Triton compiles for a GPU target offline with its own
bundled ptxas: these tests compile the kernels at the tile configurations `_pick_config`
gives an H100 / H200 (sm_90) and a T4 (sm_75, 64 KiB per block, the smallest) and read
the shared memory off the compiled kernels. Only the configurations closest to the limit
are compiled (a few seconds each), in a subprocess, since the CPU lane's TRITON_INTERPRET
replaces every kernel with its interpreted twin.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (dtype, head dim, compute capability, shared memory per block): the H100 choices that
# need the most shared memory (fp32 carries tf32x3 dots; D = 256 the widest tiles), and
# a T4's choice in half precision (sm_75 stages tiles without cp.async and needs more).
CASES = [("float32", 256, 90, None), ("float32", 128, 90, None), ("bfloat16", 256, 90, None),
         ("float16", 128, 75, 65536)]

# What both scripts start with: the offline compiler, and shared_memory(), the bytes a
# kernel compiles to for one GPU target.
_PRELUDE = r"""
import importlib, json, sys, warnings
warnings.filterwarnings("ignore")
import torch, triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print(json.dumps({"skip": f"this Triton has no offline compile API: {exc}"}))
    sys.exit(0)
C = importlib.import_module("unimrg_fast.ops._common")
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def shared_memory(kern, constexprs, arg_type, cap, warps, stages):
    # arg_type(name): the Triton type of each runtime argument
    sig = {a: "constexpr" if a in constexprs else arg_type(a) for a in kern.arg_names}
    compiled = triton.compile(ASTSource(kern, sig, constexprs),
                              target=GPUTarget("cuda", cap, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    return compiled.metadata.shared
"""

_SCRIPT = _PRELUDE + r"""
A = importlib.import_module("unimrg_fast.ops.packed_attention")
out = []
for dtype_name, head_dim, cap, smem_limit in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype_name)
    block_d = max(16, triton.next_power_of_2(head_dim))
    cfg = A._pick_config(dtype, block_d, False, 32768, smem_limit)
    entry = [e for e in A._LADDERS[(dtype == torch.float32, max(64, block_d))] if e[0] == cfg][0]
    budget = C.smem_needed(entry, smem_limit)

    def arg_type(arg):
        if arg in A._LAYOUT_ARGS and arg != "T":
            return "*i32"
        if arg in ("lse_ptr", "delta_ptr", "dlse_ptr"):
            return "*fp32"
        if arg.endswith("_ptr"):
            return "*" + TYPES[dtype]
        return "fp32" if arg in ("qk_scale", "sm_scale") else "i32"

    for name, kern, bm, bn, warps, stages in (
            ("fwd", A._attn_fwd_kernel, cfg.fwd_block_m, cfg.fwd_block_n, cfg.fwd_warps,
             cfg.fwd_stages),
            ("dq", A._attn_bwd_dq_kernel, cfg.fwd_block_m, cfg.fwd_block_n, cfg.dq_warps,
             cfg.dq_stages),
            ("dkdv", A._attn_bwd_dkdv_kernel, cfg.kv_block_m, cfg.kv_block_n, cfg.kv_warps,
             cfg.kv_stages)):
        constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, HEAD_DIM=head_dim,
                          UPCAST=False, PRECISION=A._precision(dtype, False))
        out.append(dict(case=f"sm_{cap} {dtype_name} D={head_dim} {name} {cfg}",
                        shared=shared_memory(kern, constexprs, arg_type, cap, warps, stages),
                        budget=budget, limit=smem_limit or C.SMEM_SM90))
print(json.dumps({"kernels": out}))
"""


def _compile_offline(script: str, arg) -> list:
    """The kernels `script` compiled, as dicts with case, shared, budget and limit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    run = subprocess.run([sys.executable, "-c", script, json.dumps(arg)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"offline compile failed:\n{run.stderr[-4000:]}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result["kernels"]


def _assert_fits(kernels, table: str) -> None:
    for kernel in kernels:
        assert kernel["shared"] <= kernel["limit"], (
            f"{kernel['case']}: {kernel['shared']} B of shared memory > the GPU's "
            f"{kernel['limit']} B per block: it cannot launch")
        # _pick_config trusts the recorded budget to choose for smaller GPUs
        assert kernel["shared"] <= kernel["budget"], (
            f"{kernel['case']}: {kernel['shared']} B > its recorded {kernel['budget']} B "
            f"in {table}: update the table")


def test_packed_attention_fits_h100_and_t4_shared_memory():
    pytest.importorskip("unimrg_fast.ops.packed_attention")
    kernels = _compile_offline(_SCRIPT, CASES)
    assert len(kernels) == 3 * len(CASES)
    _assert_fits(kernels, "packed_attention._LADDERS")


# The linear cross-entropy: the forward and the backward's dz kernel, 16-bit and fp32, at
# an H100's choice and in half precision at a T4's (sm_75 stages tiles without cp.async
# and needs the most). The module promises at most 32 KiB: every GPU fits them.
_LCE_SCRIPT = _PRELUDE + r"""
L = importlib.import_module("unimrg_fast.ops.linear_cross_entropy")
POINTER = {"order_ptr": "*i32", "count_ptr": "*i32", "idx_ptr": "*i32", "y_ptr": "*i64"}
PROMISE = 32768
out = []
for kind, dtype_name, cap in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype_name)
    cfg = L._pick_config(dtype, False, 16384)
    flags = dict(HAS_BIAS=True, HAS_SOFTCAP=True, UPCAST=False,
                 PRECISION=L._precision(dtype, False))
    if kind == "fwd":
        kern = L._lce_fwd_kernel
        flags.update(HAS_SMOOTHING=True, TRACK_ARGMAX=True)
    else:
        kern = L._lce_dz_kernel
        flags.update(GROUP_M=cfg.group_m, COMPUTE_DB=True)

    def arg_type(arg):
        if arg in POINTER:
            return POINTER[arg]
        if arg in ("h_ptr", "w_ptr", "b_ptr", "dz_ptr"):
            return "*" + TYPES[dtype]
        if arg.endswith("_ptr"):
            return "*fp32"
        return "fp32" if arg in ("softcap", "label_smoothing", "z_loss") else "i32"

    tiles = [cfg.block_m, cfg.block_v, cfg.block_h, cfg.num_warps, cfg.num_stages]
    constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, **flags)
    out.append(dict(case=f"sm_{cap} {dtype_name} {kind} {tiles}",
                    shared=shared_memory(kern, constexprs, arg_type, cap, cfg.num_warps,
                                         cfg.num_stages),
                    budget=PROMISE, limit=C.SMEM_SM90 if cap == 90 else C.SMEM_SM75))
print(json.dumps({"kernels": out}))
"""


def test_linear_cross_entropy_fits_h100_and_t4_shared_memory():
    cases = [(kind, dtype, 90) for kind in ("fwd", "dz") for dtype in ("bfloat16", "float32")]
    cases += [("fwd", "float16", 75), ("dz", "float16", 75)]
    kernels = _compile_offline(_LCE_SCRIPT, cases)
    assert len(kernels) == len(cases)
    _assert_fits(kernels, "the 32 KiB promise of linear_cross_entropy._pick_config")


# The regression head: both kernels at the configs a Harmon-sized head (C = 16 latent
# channels, H = 1536) gets, 16-bit and fp32, on an H100 and a T4. The module keeps them
# within 48 KiB, what every CUDA GPU gives a block without opting in.
_REGRESSION_SCRIPT = _PRELUDE + r"""
R = importlib.import_module("unimrg_fast.ops.regression_loss")
OWN_DTYPE = {"h_ptr", "w_ptr", "b_ptr", "t_ptr", "dh_ptr", "dt_ptr"}
out = []
for kind, dtype_name, cap in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype_name)
    hidden, weight = torch.empty(1, 1536, dtype=dtype), torch.empty(16, 1536, dtype=dtype)
    cfg = R._pick_config(hidden, weight, 16, False)
    fwd_precision, bwd_precision = R._precision(hidden, weight)
    if kind == "fwd":
        kern, warps, stages = R._regression_fwd_kernel, cfg.num_warps, cfg.num_stages
        constexprs = dict(BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, BLOCK_H=cfg.block_h,
                          HAS_BIAS=True, UPCAST=False, PRECISION=fwd_precision)
    else:
        kern, warps, stages = R._regression_bwd_kernel, cfg.bwd_num_warps, cfg.bwd_num_stages
        constexprs = dict(BLOCK_N=cfg.bwd_block_n, BLOCK_C=cfg.block_c,
                          BLOCK_H=cfg.bwd_block_h, COMPUTE_DH=True, COMPUTE_DW=True,
                          COMPUTE_DB=True, COMPUTE_DT=True, PRECISION=bwd_precision)

    def arg_type(arg):
        if arg in OWN_DTYPE:
            return "*" + TYPES[dtype]
        return "*fp32" if arg.endswith("_ptr") else "i32"

    out.append(dict(case=f"sm_{cap} {dtype_name} {kind} {cfg}",
                    shared=shared_memory(kern, constexprs, arg_type, cap, warps, stages),
                    budget=49152, limit=C.SMEM_SM90 if cap == 90 else C.SMEM_SM75))
print(json.dumps({"kernels": out}))
"""


def test_regression_head_fits_48_kib_on_h100_and_t4():
    pytest.importorskip("unimrg_fast.ops.regression_loss")
    cases = [(kind, dtype, cap) for kind in ("fwd", "bwd") for dtype in ("bfloat16", "float32")
             for cap in (90, 75)]
    kernels = _compile_offline(_REGRESSION_SCRIPT, cases)
    assert len(kernels) == len(cases)
    _assert_fits(kernels, "the 48 KiB promise of regression_loss._pick_config")


# The decoder's elementwise kernels (RMSNorm, SwiGLU, rotary) at the tiles a 16k pack of a
# 1.5B decoder gets on a GPU, and RMSNorm's widest row (8,192 columns: a 7B+ decoder).
# They stage nothing through shared memory but their row reductions: 48 KiB is ample, and
# the point is that they compile for sm_90 / sm_75 at all (the CPU lane only interprets).
_DECODER_SCRIPT = _PRELUDE + r"""
N = importlib.import_module("unimrg_fast.ops.rms_norm")
S = importlib.import_module("unimrg_fast.ops.swiglu")
R = importlib.import_module("unimrg_fast.ops.rotary")
out = []
for kind, cap in json.loads(sys.argv[1]):
    if kind.startswith("rms"):
        hidden = 8192 if kind.endswith("wide") else 1536
        block_n, block_h, warps = N._tiles(hidden)
        types = {"x_ptr": "*fp32", "w_ptr": "*fp32", "y_ptr": "*bf16", "dy_ptr": "*bf16",
                 "dx_ptr": "*fp32"}
        for name, kern, flags in (("fwd", N._rms_norm_fwd_kernel, {}),
                                  ("bwd", N._rms_norm_bwd_kernel, dict(NEED_DW=True))):
            arg_type = lambda a: types.get(a, "*fp32" if a.endswith("_ptr") else
                                           ("fp32" if a == "eps" else "i32"))
            out.append(dict(case=f"sm_{cap} rms_norm {name} H={hidden}", budget=49152,
                            limit=C.SMEM_SM90 if cap == 90 else C.SMEM_SM75,
                            shared=shared_memory(kern, dict(BLOCK_N=block_n, BLOCK_H=block_h,
                                                            **flags), arg_type, cap, warps, 1)))
    elif kind == "swiglu":
        cfg = S._pick_config(16384, 8960, False)
        arg_type = lambda a: "*bf16" if a.endswith("_ptr") else "i32"
        for name, kern, flags in (("fwd", S._swiglu_fwd_kernel, {}),
                                  ("bwd", S._swiglu_bwd_kernel,
                                   dict(COMPUTE_DG=True, COMPUTE_DU=True))):
            out.append(dict(case=f"sm_{cap} swiglu {name} {cfg}", budget=49152,
                            limit=C.SMEM_SM90 if cap == 90 else C.SMEM_SM75,
                            shared=shared_memory(kern, dict(BLOCK_N=cfg.block_n,
                                                            BLOCK_I=cfg.block_i, **flags),
                                                 arg_type, cap, cfg.num_warps, 1)))
    else:
        block_t, block_d2, warps = R._pick_tiles(1, 16384, 64, torch.device("cpu"), False)
        arg_type = lambda a: ("*fp32" if a in ("cos_ptr", "sin_ptr") else "*bf16") \
            if a.endswith("_ptr") else "i32"
        for backward in (False, True):
            out.append(dict(case=f"sm_{cap} rotary backward={backward} T={block_t}",
                            budget=49152, limit=C.SMEM_SM90 if cap == 90 else C.SMEM_SM75,
                            shared=shared_memory(R._rotary_kernel,
                                                 dict(BLOCK_T=block_t, BLOCK_D2=block_d2,
                                                      BACKWARD=backward),
                                                 arg_type, cap, warps, 1)))
print(json.dumps({"kernels": out}))
"""


def test_decoder_ops_compile_for_h100_and_t4():
    cases = [(kind, cap) for kind in ("rms", "rms-wide", "swiglu", "rotary") for cap in (90, 75)]
    kernels = _compile_offline(_DECODER_SCRIPT, cases)
    assert len(kernels) == 2 * len(cases)
    _assert_fits(kernels, "the 48 KiB the decoder kernels are expected to stay within")
