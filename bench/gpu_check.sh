#!/usr/bin/env bash
# The one prepared GPU check (at most 9.5 minutes, about 6 on an H200; nothing to install: torch with CUDA,
# triton, pytest, pytest-xdist, pytest-timeout and hypothesis must be there, no network):
#   1. `snr-triton check` on the GPU: every kernel variant compiled, against the float64 reference;
#   2. sync-debug: 20 steps with fresh grads, a changing active set, GradScaler, stats and
#      max_grad_norm under torch.cuda.set_sync_debug_mode("error"): no host synchronization in
#      step(); then the other CUDA-only tests (CUDA-graph capture of a step and of a whole
#      training step, by hand and by torch.compile(mode="reduce-overhead"), torch.compile of a
#      training step, >2^31 elements);
#   3. the benchmark table: 1M to 1G params in fp32 and bf16 (and bf16 states), device time
#      (triton.testing.do_bench) and the latency of one synchronized step, GB/s, % of a
#      same-size copy, ratios to torch.optim.AdamW fused (with and without clip_grad_norm_) and
#      foreach, host overhead with 1,000 tensors;
#   4. the whole test suite compiled (not interpreted), in parallel.
# Each stage has its own time limit and log, and a failure does not stop the later stages.
# Output to stdout and, where $OUT is set, logs + JSON + PNG there.
# Usage: bash bench/gpu_check.sh   (record the output in bench/RESULTS.md with date and device)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
out="${OUT:-$(mktemp -d)}"
date -u "+%Y-%m-%d %H:%M UTC"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

status=0
stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.txt, remember failure
    local name=$1 limit=$2; shift 2
    echo; echo "### $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "### $name: exit $rc in $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || status=1
}

stage check 60 python3 -m snr_triton.cli check
stage sync-debug 60 python3 -m pytest -v -p no:cacheprovider -rfE --timeout 50 \
    tests/test_gpu.py::test_no_host_synchronization_in_a_step
stage pytest_gpu 90 python3 -m pytest -v -p no:cacheprovider -rfE --timeout 120 tests/test_gpu.py \
    --deselect tests/test_gpu.py::test_no_host_synchronization_in_a_step
stage bench 120 python3 -m snr_triton.cli bench --device cuda --steps 20 --json "$out/bench_gpu.json" \
    --dtype float32 bfloat16
if [ -f "$out/bench_gpu.json" ]; then
    python3 bench/plot.py "$out/bench_gpu.json" "$out/bandwidth_gpu.png" || true
fi
# -v: each result is logged as it comes, so a stage cut off at its limit still says what failed
# (the first run, 2026-11-29, finished every test but hung at exit and lost its summary);
# one inductor compile thread per worker: no compile-worker pools left behind at exit.
TORCHINDUCTOR_COMPILE_THREADS=1 stage pytest_all 240 python3 -m pytest -v -p no:cacheprovider -rfE \
    --timeout 180 -n 12 tests/ --ignore=tests/test_distributed.py --ignore=tests/test_gpu.py
echo "gpu_check: $([ $status = 0 ] && echo ok || echo FAILED)"
exit $status
