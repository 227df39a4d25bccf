#!/usr/bin/env bash
# The GPU check of issue 17, in one command on a lent GPU machine, from the repository root (under 8 minutes on an
# H100): installs the carried wheels (bench/gpu_wheels.sh put them in .whl/), runs the `gpu` tests, then
# bench/gpu.py, and writes gpu.json, gpu_RESULTS.md and the logs to $OUT (the device tool's folder) or bench/results.
#
#   device tool: run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
T0=$(date +%s)
WHEELS="${WHEEL_DIR:-.whl}"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH="$PWD/src:/tmp/site"
else
    echo "no .whl/ folder: TRL and datasets must already be installed"
    export PYTHONPATH="$PWD/src"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import sys, torch, transformers, peft, accelerate; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
    python3 -c "import trl, datasets; print('trl', trl.__version__, 'datasets', datasets.__version__)" || echo "TRL not importable: the benchmark's TRL side will fail"
} 2>&1 | tee "$OUT/gpu_env.txt"

echo "== gpu tests ($(( $(date +%s) - T0 )) s)"
timeout 180 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu_tests.log"
TESTS_RC=${PIPESTATUS[0]}

echo "== benchmark ($(( $(date +%s) - T0 )) s)"
timeout 330 python3 bench/gpu.py --out "$OUT/gpu.json" --md "$OUT/gpu_RESULTS.md" --child-timeout 150 ${GPU_BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/gpu_bench.log"
BENCH_RC=${PIPESTATUS[0]}
echo "== done in $(( $(date +%s) - T0 )) s: tests rc $TESTS_RC, benchmark rc $BENCH_RC"
exit $(( TESTS_RC != 0 || BENCH_RC != 0 ))
