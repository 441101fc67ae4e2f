"""Where the GPU time goes: one device call that profiles a training step and splits the
linear cross-entropy and the packed attention into their parts, for deciding what to
speed up next (the benchmarks are what claims are made from; this is for diagnosis).

    python benchmarks/gpu_probe.py [profile] [lce] [attention] [flex]

    profile    torch.profiler over one fast and one plain train step at the recipe's
               shapes (qwen2.5-1.5b, 16k packs): the kernels taking the most GPU time
    lce        the fused linear CE at the 1.5B benchmark shape: forward alone, forward +
               backward, against the plain path (gradient error and peak memory too)
    attention  packed attention, Triton vs reference, the benchmark's UniMRG packs
    flex       FlexAttention on the 16k pack, its compile time printed (slow: minutes)

Every figure is a median of CUDA-event timings of single calls after a warm-up (bench).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS = []  # (section, name, ms, extra) for the table printed last


def bench(fn, warmup=3, reps=10) -> float:
    """Median ms of `reps` calls, each timed by CUDA events, after `warmup` calls. Counts,
    not milliseconds: triton.testing.do_bench takes a time budget in ms, and for a call
    longer than its budget (a 460 ms train step at rep=5) it timed a single sample."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def record(section, name, ms, extra=""):
    ROWS.append((section, name, ms, extra))
    print(f"{section:10s} {name:48s} {ms:10.3f} ms  {extra}", flush=True)


def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    record("ceiling", "bf16 matmul 8192^3", ms, f"{2 * 8192 ** 3 / ms / 1e9:.0f} TFLOP/s")


def profile():
    from torch.profiler import ProfilerActivity, profile as torch_profile
    from test_bench_train_step import make_train_state, make_train_step

    state = make_train_state()
    for impl in ("triton", "reference"):
        step, info = make_train_step(state, impl)
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        ms = bench(step, warmup=1, reps=5)
        record("step", f"train step impl={impl}", ms,
               f"{info['model_flops'] / ms / 1e9:.0f} TFLOP/s model")
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(f"--- impl={impl}: kernels by GPU time over one step")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=22,
                                        max_name_column_width=70))


def lce():
    import unimrg_fast as uf
    from test_bench_losses import make_linear_ce_inputs

    x = make_linear_ce_inputs(n=16_384, h=1_536, v=151_936, dtype=torch.bfloat16,
                              device="cuda", ignore_frac=0.1)
    h, w, y = x.hidden, x.weight, x.target
    flops3 = 6 * x.n_valid * 1536 * 151936

    with torch.no_grad():
        ms = bench(lambda: uf.linear_cross_entropy(h, w, y, impl="triton"))
        record("lce", "triton forward only", ms, f"{flops3 / 3 / ms / 1e9:.0f} TFLOP/s")

    def step(fn):
        def run():
            loss = fn()
            return torch.autograd.grad(loss, (h, w))
        return run

    ref_grads = step(lambda: uf.linear_cross_entropy(h, w, y, impl="reference"))()
    for name, fn in (("triton fwd+bwd", lambda: uf.linear_cross_entropy(h, w, y, impl="triton")),
                     ("reference fwd+bwd", lambda: uf.linear_cross_entropy(h, w, y, impl="reference"))):
        run = step(fn)
        got = run()
        err = max(float((a.float() - b.float()).norm() / b.float().norm())
                  for a, b in zip(got, ref_grads))
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        ms = bench(run)
        record("lce", name, ms, f"{flops3 / ms / 1e9:.0f} TFLOP/s useful, grad rel err "
                                f"{err:.1e}, {peak:.2f} GiB extra")


def attention():
    import unimrg_fast as uf
    from test_bench_attention import (attention_flops, draw_umm_pack, make_inputs)
    from unimrg_fast.layout import PackedLayout

    for tokens in (16384, 32768, 65536):
        samples = draw_umm_pack(tokens, seed=0)
        layout = PackedLayout.from_spans(samples, pad_to=tokens, device="cuda")
        pairs = layout.attended_pairs(len(samples))
        for passes in ("fwd", "fwd+bwd"):
            q, k, v, go = make_inputs(layout, 12, 2, 128, torch.bfloat16, passes == "fwd+bwd")
            for impl in ("triton", "reference"):
                def fwd():
                    return uf.packed_attention(q, k, v, layout, impl=impl)
                run = fwd if passes == "fwd" else (
                    lambda: torch.autograd.grad(fwd(), (q, k, v), go))
                ms = bench(run)
                tf = attention_flops(pairs, 12, 128, passes) / ms / 1e9
                record("attention", f"{tokens // 1024}k 12q2kv {passes} {impl}", ms,
                       f"{tf:.0f} TFLOP/s, density {pairs / tokens ** 2:.3f}")


def flex():
    from test_bench_attention import attention_flops, draw_umm_pack, make_inputs
    from unimrg_fast.layout import PackedLayout
    from unimrg_fast.ops import attention_peers as peers

    samples = draw_umm_pack(16384, seed=0)
    layout = PackedLayout.from_spans(samples, pad_to=16384, device="cuda")
    pairs = layout.attended_pairs(len(samples))
    # forward only, inputs without gradients: the mode Triton's forward row is timed in
    q, k, v, go = make_inputs(layout, 12, 2, 128, torch.bfloat16, False)
    mask = peers.build_flex_block_mask(layout)
    t0 = time.time()
    peers.flex_with_block_mask(q, k, v, mask)
    torch.cuda.synchronize()
    print(f"flex first call (compile) {time.time() - t0:.1f} s", flush=True)
    ms = bench(lambda: peers.flex_with_block_mask(q, k, v, mask))
    record("attention", "16k 12q2kv fwd flex", ms,
           f"{attention_flops(pairs, 12, 128, 'fwd') / ms / 1e9:.0f} TFLOP/s")


def main(argv):
    parts = argv or ["lce", "attention", "profile"]
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    ceilings()
    for part in parts:
        t0 = time.time()
        {"profile": profile, "lce": lce, "attention": attention, "flex": flex}[part]()
        print(f"[{part} took {time.time() - t0:.0f} s]", flush=True)
    print("\n=== summary")
    for section, name, ms, extra in ROWS:
        print(f"{section:10s} {name:48s} {ms:10.3f} ms  {extra}")


if __name__ == "__main__":
    main(sys.argv[1:])
