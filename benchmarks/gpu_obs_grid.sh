#!/usr/bin/env bash
# Issue 19 on the GPU machine: structured OBS and block reconstruction on the real SmolLM2-135M
# weights, with the pruning grid's protocol (C4 128 x 512 calibration, WikiText-2 512-token
# windows every 16th, fp32 evaluation).
#
# The GPU machine has no network and no gguf / lm-eval packages, and a call carries at most 64 MiB,
# so an earlier call carries the GGUF's first half (.gpu/m1/part.00) and the data sets (.gpu/data);
# this one carries the second half (.gpu/m2/part.01, with the whole file's SHA-256) and the pure-
# Python packages (.gpu/site: gguf, lm_eval, datasets, ...; .gpu/whl: multiprocess for Python 3.12).
#
#   bash benchmarks/gpu_obs_grid.sh grid    # compensation x structures, then + reconstruction
#   bash benchmarks/gpu_obs_grid.sh tasks ARGS...   # the grid's arguments for the runs to score zero-shot
set -euo pipefail
OUT=${OUT:-benchmarks/results}
source benchmarks/gpu_smollm2_env.sh  # joins the GGUF into $MODEL, installs the wheels, sets the environment
GRID="python3 benchmarks/pruning_grid.py --model $MODEL --data-dir .gpu/data --criteria taylor --allocations global --tf32-scoring"
case "$1" in
grid)
    # What each method does alone: OBS against the least-squares refit, widths (heads, KV groups,
    # channels) and FFN channels only; OBS in steps of 8 channels and of 64.
    $GRID --ratios 0.2,0.35,0.5 --compensation sequential,obs,obs:64 --structures "channel,head,kv_group;channel" \
        --out $OUT/grid_obs_selection.json
    # Combined with block reconstruction, at a few step budgets and two learning rates; partial
    # results are written after every run, so the time limit only shortens the list.
    timeout "${RECONSTRUCT_SECONDS:-300}" $GRID --ratios 0.35,0.2,0.5 \
        --compensation "obs+200@1e-4,obs+200@3e-5,obs+50@1e-4,sequential+200@1e-4" \
        --out $OUT/grid_obs_reconstruct.json || true
    ;;
tasks)
    shift
    $GRID "$@" --tasks piqa,arc_easy,hellaswag --task-limit "${TASK_LIMIT:-1000}" --out $OUT/grid_obs_tasks.json
    ;;
*)
    echo "usage: $0 grid | tasks GRID-ARGS..." >&2
    exit 2
    ;;
esac
