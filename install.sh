#!/usr/bin/env bash
# Install fastalex and its test tools into ./.venv from nothing (Python 3.10+ and pip needed).
# TORCH_SPEC picks the PyTorch build: the default is the CPU build this project's machines carry;
# on a CUDA machine use e.g. TORCH_SPEC="torch" (PyPI's CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import fastalex, torch, triton; print('fastalex', fastalex.__version__, '| torch', torch.__version__, '| triton', triton.__version__)"
