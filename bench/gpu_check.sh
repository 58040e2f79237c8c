#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a machine that has torch, transformers and accelerate but not
# the rest of this project: what it lacks travels as wheels in .whl (`make gpu-wheels` here, then the
# device tool's run with carry [".whl"]); the project itself runs from this tree. At most 10 minutes on
# one 80 GB GPU; arguments go to gpu_check.py (e.g. --blocks 16 to halve the depth).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 bench/gpu_check.py --out "${OUT:-bench/results}" "$@"
