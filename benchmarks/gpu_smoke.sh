#!/usr/bin/env bash
# One short script for a GPU machine (< 8 minutes on one GPU): what issue 11 asked to see there.
#   bash benchmarks/gpu_smoke.sh            # from the repository root, with the venv installed
# 1. precision chosen, device reads per step, peak memory, loader vs step throughput (gpu_probe.py)
# 2. every recipe for one epoch under DeepSpeed ZeRO-2 in bf16, on the GPU (tests/test_precision.py)
# 3. the EMA of a bf16 target and the fp32 normalisation layers (unit tests)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
echo "== nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
echo "== probe (fp32, then bf16 through the launcher)"
timeout 120 $PY benchmarks/gpu_probe.py --steps 30
ACCELERATE_MIXED_PRECISION=bf16 timeout 120 $PY benchmarks/gpu_probe.py --steps 30
echo "== every recipe under DeepSpeed ZeRO-2 bf16, and the precision unit tests"
timeout 300 $PY -m pytest -q -p no:xdist tests/test_precision.py "tests/test_ssl.py::test_ema_of_a_bf16_target_moves_by_the_fp32_amount"
