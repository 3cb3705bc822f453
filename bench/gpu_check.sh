#!/usr/bin/env bash
# The one prepared GPU check (under 8 minutes on an H100/H200; nothing to install: torch with CUDA
# and triton must be there, no network): the test suite compiled (not interpreted), including the
# CUDA-graph capture, torch.compile of a training step and >2^31-element tests (tests/test_gpu.py),
# then the benchmark table: 16M, 64M, 256M and 1G params in fp32 and bf16 (and bf16 states),
# ms/step, GB/s, % of a same-size copy, ratios to torch.optim.AdamW fused and foreach, host
# overhead with 1,000 tensors. Output to stdout and, where $OUT is set, JSON + PNG + logs there.
# Usage: bash bench/gpu_check.sh   (record the output in bench/RESULTS.md with date and device)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
out="${OUT:-$(mktemp -d)}"
date -u "+%Y-%m-%d %H:%M UTC"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

status=0
timeout 300 python -m pytest -q -x -p no:cacheprovider tests/ --ignore=tests/test_distributed.py \
    2>&1 | tail -n 25 | tee "$out/pytest.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
timeout 240 python -m snr_triton.cli bench --device cuda --steps 20 --json "$out/bench_gpu.json" \
    --dtype float32 bfloat16 2>&1 | tee "$out/bench_gpu.md"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
if [ -f "$out/bench_gpu.json" ]; then
    python bench/plot.py "$out/bench_gpu.json" "$out/bandwidth_gpu.png" || true
fi
echo "gpu_check: $([ $status = 0 ] && echo ok || echo FAILED)"
exit $status
