#!/usr/bin/env bash
# The sharded-training benchmark (bench_sharded.py) on GPUs: NCCL, one rank per GPU, peak memory from
# torch.cuda.max_memory_allocated. One command from the repository root:
#
#   benchmarks/gpu_sharded.sh                      # 2 and 4 ranks where the GPUs allow, 3 runs
#   RANKS="2 8" RUNS=1 benchmarks/gpu_sharded.sh   # other world sizes, one run
#   benchmarks/gpu_sharded.sh --impls fsdp2 functrain-eager   # extra arguments go to bench_sharded.py
#
# NCCL refuses two ranks on one GPU, so the world sizes are capped at the GPU count. On a single GPU
# it runs 1 rank: no communication, which measures what the DTensor machinery costs per step against
# FSDP2's, not the sharding itself. It writes benchmarks/results/sharded-cuda.json and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then
    echo "gpu_sharded.sh: no CUDA device visible to torch" >&2
    exit 1
fi
if [ -z "${RANKS:-}" ]; then
    RANKS=""
    for n in 2 4; do [ "$n" -le "$GPUS" ] && RANKS="$RANKS $n"; done
    RANKS=${RANKS:-1}
fi
for n in $RANKS; do
    if [ "$n" -gt "$GPUS" ]; then
        echo "gpu_sharded.sh: $n ranks but $GPUS GPU(s): NCCL needs one GPU per rank" >&2
        exit 1
    fi
done
# shellcheck disable=SC2086  # RANKS is a list of numbers
exec "$PYTHON" benchmarks/bench_sharded.py --device cuda --scale full --ranks $RANKS --runs "${RUNS:-3}" \
    --json benchmarks/results/sharded-cuda.json "$@"
