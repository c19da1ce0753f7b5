"""Which torch releases the package admits and which were tested; checked once at import.

Admitted: torch >= 2.4 (``torch.library.custom_op``, which every op is registered with, first shipped
in 2.4) and < 3 (a new major release may change the operator and autograd APIs the ops build on).
pyproject.toml declares the same range; a torch outside it, installed past pip's check or imported
from elsewhere, fails at ``import fastrl_kernels`` with one message rather than deep inside an op.
Set FASTRL_ALLOW_UNTESTED_TORCH=1 to try such a torch anyway (a warning instead of the error).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from typing import Optional

MIN_TORCH = (2, 4)
BELOW_TORCH = (3, 0)
REQUIREMENT = "torch>=2.4,<3"
# Where the whole test suite runs (scripts/setup-venv.sh installs it, CI runs on it).
TESTED_TORCH_CPU = "2.13.0"
ALLOW_ENV = "FASTRL_ALLOW_UNTESTED_TORCH"


def torch_release(version: str) -> Optional[tuple]:
    """(major, minor) of a torch version string ("2.13.0+cpu", "2.16.0.dev20270101", "2.11.0a0+git12ab");
    None when it does not start with two numbers."""
    match = re.match(r"\s*v?(\d+)\.(\d+)", str(version))
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_torch(version: str, environ: Mapping = os.environ) -> None:
    """Raise ImportError when torch ``version`` is outside the admitted range (a warning under ALLOW_ENV).

    A pre-release or local build of an admitted minor release is admitted: only major.minor is read.
    """
    release = torch_release(version)
    if release is not None and MIN_TORCH <= release < BELOW_TORCH:
        return
    found = f"torch {version}" if release is not None else f"a torch whose version {version!r} cannot be read"
    needs = f"fastrl_kernels needs {REQUIREMENT} and found {found}"
    if environ.get(ALLOW_ENV, "").strip() not in ("", "0"):
        warnings.warn(f"{needs}; trying it untested, as {ALLOW_ENV} is set.", RuntimeWarning, stacklevel=3)
        return
    raise ImportError(
        f"{needs}. The test suite runs on torch {TESTED_TORCH_CPU}; install a torch in that range "
        f"(e.g. pip install 'torch=={TESTED_TORCH_CPU}'), or set {ALLOW_ENV}=1 to try this one untested."
    )
