#!/usr/bin/env bash
# Mutation testing (mutmut) of fastrl_kernels/losses, ops, reference and torch_backend.py against the
# fast tests, one worker; see docs/mutation.md.
#   bash scripts/mutation.sh                                   # every configured module
#   bash scripts/mutation.sh fastrl_kernels/losses/kl.py fastrl_kernels/reference/
# Prints the score per module; the surviving mutants go to mutants/mutation-report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/mutmut ]; then
    bash scripts/setup-venv.sh test,mutation
fi
# Few Hypothesis examples, the same ones every run (tests/conftest.py).
export HYPOTHESIS_PROFILE=mutation
# One core: the tests are small, and torch's OpenMP pool then never has to survive mutmut's fork.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
exec .venv/bin/python scripts/mutation.py "$@"
