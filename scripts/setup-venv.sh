#!/usr/bin/env bash
# Creates (or reuses) .venv, installs torch==2.13.0 when torch is absent (an open range would pull a
# multi-GB CUDA build), then the package with the extras named as arguments (default: train).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    "${PIP[@]}" "torch==2.13.0"
fi
extras="${*:-train}"
extras="${extras// /,}"
"${PIP[@]}" -e ".[${extras}]"
