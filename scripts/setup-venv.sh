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
if [[ ",${extras}," == *",test,"* ]]; then
    # verl's loss functions, for the equivalence tests: its declared dependencies (ray, vllm, ...) are
    # not needed by verl.trainer.ppo.core_algos, so it and the few pure-Python modules it imports
    # are installed without them.
    "${PIP[@]}" --no-deps verl==0.9.1 omegaconf==2.4.0 antlr4-python3-runtime==4.9.3 codetiming==1.4.0 \
        tensordict==0.15.3 cloudpickle pyvers
fi
