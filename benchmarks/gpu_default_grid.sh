#!/usr/bin/env bash
# Issues 18 and 19 on the GPU machine. After a call that carried .gpu/m1 and .gpu/data:
#   bash benchmarks/gpu_default_grid.sh grid    # the default prune (magnitude order, log_increase budgets,
#       # FFN channels, structured OBS) of the real SmolLM2-135M at 20 / 35 / 50%, with zero-shot accuracy,
#       # beside the previous default (Taylor, global allocation, heads, KV groups and channels, sequential refit)
#   bash benchmarks/gpu_default_grid.sh default # the first half of `grid` only (the default's rows)
#   bash benchmarks/gpu_default_grid.sh scale   # the default prune from the shell, timed; the 8B shape
set -euo pipefail
OUT=${OUT:-benchmarks/results}
source benchmarks/gpu_smollm2_env.sh
GRID="python3 benchmarks/pruning_grid.py --model $MODEL --data-dir .gpu/data --ratios 0.2,0.35,0.5 --tasks piqa,arc_easy,hellaswag --task-limit 500"
case "$1" in
default)
    $GRID --criteria magnitude --allocations log_increase --compensation obs --structures channel \
        --out $OUT/default_gpu_grid.json
    ;;
grid)
    $GRID --criteria magnitude --allocations log_increase --compensation obs --structures channel \
        --out $OUT/default_gpu_grid.json
    $GRID --criteria taylor --allocations global --compensation sequential --structures channel,head,kv_group \
        --out $OUT/previous_default_gpu_grid.json
    ;;
scale)
    python3 benchmarks/default_prune.py --model $MODEL --targets 0.2 --extra "--device cuda" --json $OUT/default_prune_gpu.json
    python3 benchmarks/gpu_default_8b.py --out $OUT/default_prune_8b_gpu.json
    ;;
*)
    echo "usage: $0 default | grid | scale" >&2
    exit 2
    ;;
esac
