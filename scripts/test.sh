#!/usr/bin/env bash
# The README's test command: install the project with its test extras (the ray extra, so
# tests/test_ray.py runs on a real local Ray cluster; the eval extra, so tests/test_lm_eval.py runs
# lm-evaluation-harness against a live server), lint, run the default suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m real_model`).
set -euo pipefail
cd "$(dirname "$0")/.."
# The CPU build of torch first (a file of it is on disk here): the package pins no torch, and an
# unpinned `pip install torch` from PyPI pulls a multi-GB CUDA build.
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[dev,ray,eval]'
python3 -m ruff check .
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
python3 -m pytest -q "$@"
