#!/usr/bin/env bash
# One GPU command: the CUDA tests, then the step and optimiser-update benchmarks on the GPU, and a
# report of each in benchmarks/results/gpu-*.md with the device named. From the repository root:
#
#   benchmarks/gpu.sh                                    # needs a CUDA device; .venv/bin/python or $PYTHON
#   TORCHDATA_WHEEL=torchdata-0.11.0-py3-none-any.whl benchmarks/gpu.sh   # installs torchdata first
#   GPU_SH_DEVICE=cpu GPU_SH_SCALE=smoke benchmarks/gpu.sh                # a dry run of this script on a CPU
#
# Sized for under 8 minutes on one H100/H200: each phase runs under its own time limit (the tests 150 s,
# the step groups 240 s, the updates 90 s), so one slow phase cannot take the whole budget, and a phase
# that runs out is reported as such in its .md file (the others still run). The step groups are the
# ones whose compiled graphs are small enough to compile in that time (mlp-step, gpt-step, ensemble,
# resnet18-frozen-step); the update groups are AdamW and SGD with momentum at 10M and 100M parameters.
#
# Writes benchmarks/results/gpu-tests.md, gpu-step.{json,md}, gpu-update.{json,md}; exits non-zero when
# the tests fail or no benchmark ran.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
DEVICE=${GPU_SH_DEVICE:-cuda}
SCALE=${GPU_SH_SCALE:-full}
OUT=${GPU_SH_OUT:-benchmarks/results}
LOGS=$(mktemp -d)  # full pytest logs; the reports quote their ends
mkdir -p "$OUT"

if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu.sh: no CUDA device visible to torch" >&2
    exit 1
fi
if ! "$PYTHON" -c "import torchdata.nodes" 2>/dev/null; then
    if [ -z "${TORCHDATA_WHEEL:-}" ]; then
        echo "gpu.sh: torchdata is not installed; set TORCHDATA_WHEEL to its wheel (no network needed)" >&2
        exit 1
    fi
    "$PYTHON" -m pip install -q --no-deps "$TORCHDATA_WHEEL" || exit 1
fi
STACK=$("$PYTHON" -c "
import torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() and '$DEVICE' == 'cuda' else 'CPU (dry run)'
print(f'{name}; torch {torch.__version__}, CUDA {torch.version.cuda}')")
echo "gpu.sh: $STACK"

# 1. The tests that skip without a GPU: tests/test_gpu.py and the CUDA cases of the other files.
tests_rc=0
timeout 150 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py \
    tests/test_loop.py::test_fit_on_cuda_from_a_cpu_state_syncs_once_per_log \
    tests/test_data.py::test_cuda_batches_arrive_on_the_device_equal_to_the_cpu_ones \
    tests/test_data_hostile.py::test_a_sample_that_never_returns_times_out_on_a_cuda_loader \
    >"$LOGS/tests.log" 2>&1 || tests_rc=$?
{
    echo "# CUDA tests: $STACK"
    echo
    echo "Command: \`benchmarks/gpu.sh\` (exit status $tests_rc$([ $tests_rc = 124 ] && echo ': ran past its 150 s'))."
    echo
    echo '```'
    tail -n 25 "$LOGS/tests.log"
    echo '```'
} >"$OUT/gpu-tests.md"

# 2. Benchmarks: one pytest run per part, each JSON turned into a markdown report.
bench() {  # bench NAME LIMIT_S PYTEST_ARGS...
    local name=$1 limit=$2
    shift 2
    local rc=0
    timeout "$limit" "$PYTHON" -m pytest -q -p no:cacheprovider "$@" --bench-device "$DEVICE" --bench-scale "$SCALE" \
        --benchmark-json "$OUT/gpu-$name.json" >"$LOGS/$name.log" 2>&1 || rc=$?
    if [ -s "$OUT/gpu-$name.json" ]; then
        "$PYTHON" benchmarks/report.py "$OUT/gpu-$name.json" --title "GPU $name benchmarks: $STACK" -o "$OUT/gpu-$name.md"
    else
        echo "# GPU $name benchmarks: $STACK" >"$OUT/gpu-$name.md"
    fi
    if [ "$rc" != 0 ]; then
        printf '\nThe run ended with exit status %s%s; its log ends:\n\n```\n%s\n```\n' "$rc" \
            "$([ "$rc" = 124 ] && echo " (past its ${limit} s limit: the entries above are the ones that finished)")" \
            "$(tail -n 15 "$LOGS/$name.log")" >>"$OUT/gpu-$name.md"
    fi
    echo "gpu.sh: $name -> $OUT/gpu-$name.md (exit status $rc)"
}
bench step 240 benchmarks/bench_step.py -k "test_mlp_step or test_gpt_step or test_ensemble or test_resnet18_frozen"
bench update 90 benchmarks/bench_optimiser_update.py -k "(test_adamw_update or test_sgd_momentum_update) and (10M or 100M)"

[ "$tests_rc" = 0 ] || { echo "gpu.sh: the CUDA tests failed (see $OUT/gpu-tests.md)" >&2; exit 1; }
[ -s "$OUT/gpu-step.json" ] || [ -s "$OUT/gpu-update.json" ] || { echo "gpu.sh: no benchmark ran" >&2; exit 1; }
