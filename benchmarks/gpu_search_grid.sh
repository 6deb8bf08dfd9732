#!/usr/bin/env bash
# Issue 20 on the GPU machine: allocation search against global allocation on the real
# SmolLM2-135M weights (benchmarks/allocation_search_grid.py, the grid's protocol).
#
# A call carries at most 64 MiB, so the GGUF travels in two halves, as in gpu_obs_grid.sh: a first
# call carries .gpu/m1 (the first half) and .gpu/data, which stay in the machine's copy of the
# tree while it is warm; the next call carries .gpu/m2 (second half and SHA-256), .gpu/site and .gpu/whl.
#
#   bash benchmarks/gpu_search_grid.sh stash           # call 1: nothing but the carrying
#   bash benchmarks/gpu_search_grid.sh grid ARGS...    # call 2: allocation_search_grid.py ARGS
set -euo pipefail
OUT=${OUT:-benchmarks/results}
case "$1" in
stash)
    ls -la .gpu/m1 .gpu/data | head -3
    ;;
grid)
    shift
    source benchmarks/gpu_smollm2_env.sh  # joins the GGUF into $MODEL, installs the wheels, sets the environment
    python3 benchmarks/allocation_search_grid.py --model $MODEL --data-dir .gpu/data "$@"
    ;;
*)
    echo "usage: $0 stash | grid ARGS..." >&2
    exit 2
    ;;
esac
