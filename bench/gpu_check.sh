#!/usr/bin/env bash
# The one prepared GPU check (at most GPU_CHECK_SECONDS, default 570 s; nothing to install: torch
# with CUDA, triton, pytest, pytest-xdist, pytest-timeout and hypothesis must be there, no network):
#   1. `snr-triton check` on the GPU: every kernel variant compiled, against the float64 reference;
#   2. the benchmark table: 1M to 1G params in fp32 and bf16, device time (triton.testing.do_bench)
#      and the latency of one synchronized step, GB/s, % of a same-size copy, ratios to
#      torch.optim.AdamW fused (with and without clip_grad_norm_) and foreach; SNRAdamW with fp32,
#      bf16 and 8-bit states and with max_grad_norm; host overhead with 1,000 tensors;
#   3. sync-debug: 20 steps with fresh grads, a changing active set, GradScaler, stats and
#      max_grad_norm, fp32 and 8-bit states, under torch.cuda.set_sync_debug_mode("error"): no
#      host synchronization in step(); then the other CUDA-only tests (CUDA-graph capture of a
#      step and of a whole training step, by hand and by torch.compile(mode="reduce-overhead"),
#      torch.compile of a training step, >2^31 elements);
#   4. the whole test suite compiled (not interpreted), in parallel, in the time that is left.
# Each stage has its own time limit and log, and a failure does not stop the later stages.
# Output to stdout and, where $OUT is set, logs + JSON + PNG there (8 files: the device tool's limit
# with the whole log beside them).
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
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-570}))  # the whole script; the last stage gets what is left
# A rerun after fixes: GPU_CHECK_STAGES names the stages to run (default all), GPU_CHECK_TESTS the
# tests pytest_all runs instead of the whole suite.
stages=" ${GPU_CHECK_STAGES:-check bench sync-debug pytest_gpu pytest_all} "
stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.txt, remember failure
    local name=$1 limit=$2; shift 2
    [[ "$stages" == *" $name "* ]] || return 0
    local left=$((deadline - SECONDS - 5))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then echo "### $name: not run (the script's time is spent)"; status=1; return; fi
    echo; echo "### $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "### $name: exit $rc in $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || status=1
}

stage check 60 python3 -m snr_triton.cli check
# the table before the long stages: its rows are printed cell by cell, so a cut keeps what ran
stage bench 150 python3 -m snr_triton.cli bench --device cuda --steps 20 --json "$out/bench_gpu.json" \
    --dtype float32 bfloat16
if [ -f "$out/bench_gpu.json" ]; then
    python3 bench/plot.py "$out/bench_gpu.json" "$out/bandwidth_gpu.png" || true
fi
stage sync-debug 60 python3 -m pytest -v -p no:cacheprovider -rfE --timeout 50 \
    tests/test_gpu.py::test_no_host_synchronization_in_a_step
stage pytest_gpu 90 python3 -m pytest -v -p no:cacheprovider -rfE --timeout 120 tests/test_gpu.py \
    -k "not test_no_host_synchronization_in_a_step"
# -v: each result is logged as it comes, so a stage cut off at its limit still says what failed
# (the first run, 2026-11-29, finished every test but hung at exit and lost its summary);
# one inductor compile thread per worker: no compile-worker pools left behind at exit.
# The files that run the Triton kernels compiled come first (xdist hands out tests in collection
# order), the CPU-only and slow CPU-compile files last; pytest collects each file once.
# Two torch threads per worker (the 2026-12-04 run oversubscribed 16 cores with 14 x 16 threads, and
# three CPU-bound tests ran past their limit).
default_tests="tests/test_triton.py tests/test_8bit_states.py tests/test_clipping.py tests/test_backends.py
    tests/test_stochastic_rounding.py tests/test_between_steps.py tests/test_state_changes.py tests/test_amp.py
    tests/test_checkpoints.py tests/test_properties.py tests/ --ignore=tests/test_distributed.py
    --ignore=tests/test_gpu.py --ignore=tests/test_codegen.py"  # codegen: ptxas on the CPU, as in CI
# shellcheck disable=SC2086  # word splitting of the test list is meant
OMP_NUM_THREADS=2 TORCHINDUCTOR_COMPILE_THREADS=1 stage pytest_all 600 python3 -m pytest -v -p no:cacheprovider \
    -rfE --timeout 180 -n 14 ${GPU_CHECK_TESTS:-$default_tests}
echo "gpu_check: $([ $status = 0 ] && echo ok || echo FAILED)"
exit $status
