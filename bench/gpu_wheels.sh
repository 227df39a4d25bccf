#!/usr/bin/env bash
# Downloads, on a machine with PyPI access, the wheels the GPU machine lacks (its image has torch 2.11 + CUDA 13,
# transformers, peft, accelerate, pyarrow, pandas, xxhash; no TRL, datasets or gguf) into .whl/ at the repository root,
# git-ignored locally; bench/gpu_run.sh installs them there. Pure-Python wheels only (about 10 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p .whl
PIP="${PIP:-python3 -m pip}"
$PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0
ls -la .whl
