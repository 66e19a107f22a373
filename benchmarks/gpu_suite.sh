#!/usr/bin/env bash
# The GPU checks, as one script that fits in 8 minutes on one GPU (issue 14). Nothing depends on it.
#   bash benchmarks/gpu_suite.sh            # from the repository root, with the venv installed
# 1. bf16 + compile + channels_last train-step MFU and peak memory, ResNet-50 and ViT-B/16, vs timm (gpu_mfu.py)
# 2. the fast-path switches one at a time on the recipes' CIFAR models (fast_paths_bench.py)
# 3. every recipe, a short run on the GPU at its defaults (compile on, bf16 auto), and under DeepSpeed ZeRO-2 bf16
# 4. host syncs per step, precision chosen, loader vs step throughput (gpu_probe.py, the earlier gpu_smoke.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d)}
echo "== nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
echo "== 1. MFU (bf16 + compile + channels_last), visrep vs timm"
timeout 200 $PY benchmarks/gpu_mfu.py --rounds 3 --steps 10 --warmup 4
echo "== 2. fast paths on the recipes' models (batch 512 at 32 px)"
timeout 90 $PY benchmarks/fast_paths_bench.py --device cuda --batch-size 512 --rounds 3 --models "ResNet-20 (teacher)" "ResNet-56"
echo "== 3. every recipe, 30 steps at its defaults on the GPU (compile forced on)"
for r in distill byol clip finetune adapt segment "selfsup --method dino" "selfsup --method mocov3"; do
  name=${r%% *}; extra=${r#"$name"}  # selfsup: DINO (EMA teacher, centre) and MoCo v3 (EMA keys)
  # shellcheck disable=SC2086
  timeout 60 $PY -m accelerate.commands.launch --num_processes 1 recipes/$name.py $extra \
    --output-dir "$OUT/${r/ --method /-}" --run.compile on --run.stop-after-steps 30 --run.progress False 2>&1 | tail -3
done
echo "== 3b. every recipe for one epoch under DeepSpeed ZeRO-2 bf16, and the precision unit tests"
timeout 120 $PY -m pytest -q -p no:xdist tests/test_precision.py "tests/test_ssl.py::test_ema_of_a_bf16_target_moves_by_the_fp32_amount"
echo "== 4. probe (fp32, then bf16 through the launcher)"
timeout 45 $PY benchmarks/gpu_probe.py --steps 30
ACCELERATE_MIXED_PRECISION=bf16 timeout 45 $PY benchmarks/gpu_probe.py --steps 30
