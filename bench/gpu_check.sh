#!/usr/bin/env bash
# One prepared GPU check (a few minutes on an H100/H200): the test suite compiled (not interpreted),
# CUDA-graph capture and >2^31-element tests, then the GPU benchmark table. Needs torch (CUDA) and
# triton already installed; no network. Output goes to stdout and, where $OUT is set, to $OUT/.
# Usage: bash bench/gpu_check.sh        (record the output in bench/RESULTS.md with date and device)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
out="${OUT:-$(mktemp -d)}"
date -u "+%Y-%m-%d %H:%M UTC"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

status=0
timeout 300 python -m pytest -q -x -p no:cacheprovider tests/ 2>&1 | tail -n 25 | tee "$out/pytest.txt" || status=1
timeout 240 python -m snr_triton.cli bench --device cuda --steps 20 --json "$out/bench_gpu.json" \
    --dtype float32 bfloat16 2>&1 | tee "$out/bench_gpu.md" || status=1
if [ -f "$out/bench_gpu.json" ]; then
    python bench/plot.py "$out/bench_gpu.json" "$out/bandwidth_gpu.png" || true
fi
echo "gpu_check: $([ $status = 0 ] && echo ok || echo FAILED)"
exit $status
