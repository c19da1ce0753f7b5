"""pytest plugin loaded in mutmut's test runs by scripts/mutation.py: appends "<mutant> <seconds>" for
each mutant's test session to the file named by FASTRL_MUTATION_TIMES (mutmut's fork server reports no
durations of its own)."""

import os
import time

_start = 0.0


def pytest_sessionstart(session):
    global _start
    _start = time.monotonic()


def pytest_sessionfinish(session, exitstatus):
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if "__mutmut_" in mutant:
        with open(os.environ["FASTRL_MUTATION_TIMES"], "a") as times:
            times.write(f"{mutant} {time.monotonic() - _start:.3f}\n")
