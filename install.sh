#!/usr/bin/env bash
# Install fastalex and its test tools into ./.venv from nothing (Python 3.10+ and pip needed),
# and Fashion-MNIST where the system's package manager has it.
# TORCH_SPEC picks the PyTorch build: the default is the CPU build this project's machines carry;
# on a CUDA machine use e.g. TORCH_SPEC="torch" (PyPI's CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
# Fashion-MNIST (the default training data) from Debian's package where apt is there; optional:
# fastalex downloads it otherwise, so no root or no apt is not an error.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    { $SUDO apt-get update -q >/dev/null || true; $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
        || echo "note: could not install dataset-fashion-mnist; fastalex will download Fashion-MNIST" >&2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import fastalex, torch, triton; print('fastalex', fastalex.__version__, '| torch', torch.__version__, '| triton', triton.__version__)"
