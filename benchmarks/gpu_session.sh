#!/usr/bin/env bash
# The GPU checks and figures of a session that has a CUDA machine, one slice per command so
# that each fits a 10-minute limit (each slice first builds the package in place: a fresh
# machine is bare, and nothing is fetched from a registry):
#
#   bash benchmarks/gpu_session.sh SLICE[,SLICE...] [LOG_DIR]
#
# Several slices, comma-separated, run in one command after one build (a machine start
# costs ~60 s of device time per command). Two commands fit the 10-minute limit by the
# last wall times: `estimate,tests,decoder` (~5-7 minutes; decoder not timed yet), then
# `losses,attention` (~2-3 minutes). A failing slice does not stop the next ones; the
# command exits 1 if any failed.
#
#   tests       the GPU lane of the tests (pytest -m gpu)
#   losses      loss / head benchmarks        -> benchmarks/results/<tag>-losses.json
#   attention   packed-attention benchmarks   -> benchmarks/results/<tag>-attention.json
#   decoder     RMSNorm / SwiGLU / rotary and one decoder layer -> <tag>-decoder.json
#   train-step  train-step + layout benchmarks -> benchmarks/results/<tag>-train-step.json
#   trainer     the main job on the GPU (fast kernels), then a 1-process torchrun run with
#               --parallel fsdp (one GPU: a plain run, nothing sharded; FSDP2 itself is
#               tested by the CPU lane's 2-process gloo tests), a checkpoint and a resume
#   estimate    python -m trainer --estimate --recipe unimrg-harmon-1.5b --gpus 8, with the
#               fast path also timed without the fused decoder ops (fast-hf-decoder)
#   probe       benchmarks/gpu_probe.py: where a train step's GPU time goes (profile), and
#               the LCE / attention split (diagnosis, not claims)
#
# A session's device time is short (30 minutes, 10 per command, machine start included):
# run estimate first (the recipe's time budget), then tests, then the benchmark slices.
#
# LOG_DIR (default: $OUT when set, else benchmarks/results) gets ONE log, gpu-session.log
# (the build and every slice, in order), and a copy of each benchmark slice's results JSON,
# even when some of its rows failed: at most 6 files for every slice (the device tool
# returns 8). <tag> is h200-YYYYMMDD, or $RESULTS_TAG. Python: $PYTHON or python3.
# BENCH_K: a pytest -k expression for the benchmark slices. Unset, the attention slice
# leaves out the flex rows ("not flex"): flex's first create_block_mask of a 16k pack took
# ~3 minutes on an H200 with torch 2.11, one per pack size; BENCH_K= (empty) keeps them.
# Optional peers (liger-kernel, cut-cross-entropy) install from wheels in ./.wheels when
# that folder exists (carry it); without them their benchmark rows are skipped, not failed.
set -euo pipefail

slices=${1:?"usage: bash benchmarks/gpu_session.sh SLICE[,SLICE...] [LOG_DIR]; slices: tests, losses, attention, decoder, train-step, trainer, estimate, probe"}
logs=${2:-${OUT:-benchmarks/results}}
tag=${RESULTS_TAG:-h200-$(date +%Y%m%d)}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
IFS=, read -r -a slice_list <<<"$slices"
[ ${#slice_list[@]} -gt 0 ] || { echo "no slice named" >&2; exit 2; }
for slice in "${slice_list[@]}"; do   # all checked before the build: a typo costs nothing
    case "$slice" in
    tests | losses | attention | decoder | train-step | trainer | estimate | probe) ;;
    *)
        echo "unknown slice '$slice': tests, losses, attention, decoder, train-step, trainer, estimate or probe" >&2
        exit 2 ;;
    esac
done
mkdir -p "$logs" benchmarks/results

build() {
    # the C++ host helpers in place (pybind11 is there); without them the numpy twins serve
    "$py" setup.py -q build_ext --inplace >/dev/null 2>&1 ||
        echo "note: the native extension did not build; the numpy twins are used"
    if [ -d .wheels ]; then
        "$py" -m pip install -q --no-index --find-links .wheels liger-kernel cut-cross-entropy ||
            echo "note: the peer wheels in .wheels did not install"
    fi
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    "$py" -m unimrg_fast.backends
}

bench() {   # bench NAME K FILE...: one benchmark slice, its JSON copied next to the log
    local name=$1 k=$2 rc=0
    shift 2
    # a failed row fails the slice, but the rows that ran are still copied out (the JSON
    # is written on the device, which is handed back after the command); an older file of
    # the same name (a committed one, the same day's tag) must not pass for this run's
    rm -f "benchmarks/results/$tag-$name.json"
    "$py" -m pytest "$@" ${k:+-k "$k"} --benchmark-only -q -p no:cacheprovider \
        --results-save "$tag-$name" || rc=$?
    cp "benchmarks/results/$tag-$name.json" "$logs/" 2>/dev/null || true
    return "$rc"
}

run_slice() {
    case "$slice" in
    tests)
        "$py" -m pytest tests -m gpu -q -rs -p no:cacheprovider ;;
    losses)
        bench losses "${BENCH_K-}" benchmarks/test_bench_losses.py ;;
    attention)
        bench attention "${BENCH_K-not flex}" benchmarks/test_bench_attention.py ;;
    decoder)
        bench decoder "${BENCH_K-}" benchmarks/test_bench_decoder_ops.py ;;
    train-step)
        bench train-step "${BENCH_K-}" benchmarks/test_bench_train_step.py \
            benchmarks/test_bench_layout_metadata.py ;;
    trainer)
        local out
        out=$(mktemp -d)
        "$py" -m trainer --fast-kernels --out "$out" --name main --no-progress
        "$py" -m torch.distributed.run --standalone --nproc_per_node 1 -m trainer --fast-kernels \
            --parallel fsdp --steps 6 --checkpoint-every 3 --out "$out" --name fsdp --no-progress
        "$py" -m torch.distributed.run --standalone --nproc_per_node 1 -m trainer --fast-kernels \
            --parallel fsdp --steps 9 --checkpoint-every 3 --out "$out" --no-progress \
            --resume "$out/fsdp"
        cp "$out/main/summary.txt" "$logs/trainer-summary.txt" ;;
    estimate)
        # fast-hf-decoder: what the fused RMSNorm / SwiGLU / rotary add to the fast path
        "$py" -m trainer --estimate --recipe unimrg-harmon-1.5b --gpus 8 \
            --paths fast,fast-hf-decoder,plain ;;
    probe)
        "$py" benchmarks/gpu_probe.py lce attention profile ;;
    esac
}

log="$logs/gpu-session.log"
build 2>&1 | tee "$log"
failed=()
for slice in "${slice_list[@]}"; do
    # each slice ends with its wall time, so that the next session can plan its device budget
    # (a subshell with its own -e, outside any `if` / `&&`: bash ignores -e there, and a
    # slice of several commands would then go on past a failed one)
    start=$SECONDS
    echo "=== slice $slice" | tee -a "$log"
    set +e
    (set -e; run_slice; echo "slice $slice took $((SECONDS - start))s") 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" -ne 0 ]; then
        echo "slice $slice FAILED (exit $rc) after $((SECONDS - start))s" | tee -a "$log"
        failed+=("$slice")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed slices: ${failed[*]}"
    exit 1
fi
