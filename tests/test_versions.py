"""The torch versions the package admits (``fastrl_kernels/versions.py``), checked at import."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from fastrl_kernels import versions

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "version",
    ["2.4.0", "2.4.0a0+git1234abc", "2.11.0", "2.13.0+cpu", "2.15.0", "2.16.0.dev20270101+cu130", "2.99.1"],
)
def test_admitted_versions_pass(version):
    versions.check_torch(version, environ={})


@pytest.mark.parametrize("version", ["1.13.1", "2.0.0", "2.3.1", "2.3.0a0+git1", "3.0.0", "3.1.0a0", "10.0"])
def test_untested_major_changes_fail_with_one_clear_message(version):
    with pytest.raises(ImportError) as error:
        versions.check_torch(version, environ={})
    message = str(error.value)
    assert f"found torch {version}" in message
    assert "torch>=2.4,<3" in message and versions.TESTED_TORCH_CPU in message
    assert "FASTRL_ALLOW_UNTESTED_TORCH=1" in message


def test_unreadable_version_fails_naming_it():
    with pytest.raises(ImportError, match=r"whose version 'custom' cannot be read"):
        versions.check_torch("custom", environ={})


@pytest.mark.parametrize(("value", "raises"), [("1", False), ("yes", False), ("0", True), ("", True)])
def test_override_turns_the_error_into_a_warning(value, raises):
    if raises:
        with pytest.raises(ImportError):
            versions.check_torch("3.0.0", environ={versions.ALLOW_ENV: value})
        return
    with pytest.warns(RuntimeWarning, match=r"found torch 3\.0\.0; trying it untested"):
        versions.check_torch("3.0.0", environ={versions.ALLOW_ENV: value})


def _import_with_torch_version(version: str, **env: str) -> subprocess.CompletedProcess:
    code = f"import torch\ntorch.__version__ = {version!r}\nimport fastrl_kernels\nprint('imported')\n"
    environ = {k: v for k, v in os.environ.items() if k != versions.ALLOW_ENV}
    return subprocess.run(
        [sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True, timeout=120
    )


def test_import_fails_on_an_untested_torch_with_the_message_and_no_deeper_traceback():
    result = _import_with_torch_version("3.0.0")
    assert result.returncode != 0 and "imported" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fastrl_kernels needs torch>=2.4,<3 and found torch 3.0.0"), result.stderr


def test_import_succeeds_on_the_current_release_and_under_the_override():
    assert "imported" in _import_with_torch_version("2.15.0").stdout
    result = _import_with_torch_version("3.0.0", FASTRL_ALLOW_UNTESTED_TORCH="1")
    assert "imported" in result.stdout and "trying it untested" in result.stderr


def test_the_declared_dependency_is_the_checked_range():
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = re.search(r'^dependencies = \[(.*)\]', pyproject, re.M).group(1)
    torch_requirement = [r.strip('" ') for r in declared.split(", ") if r.strip('" ').startswith("torch")]
    assert torch_requirement == [versions.REQUIREMENT]
    low = ".".join(map(str, versions.MIN_TORCH[:2]))
    assert f">={low}" in versions.REQUIREMENT and f"<{versions.BELOW_TORCH[0]}" in versions.REQUIREMENT
    assert versions.BELOW_TORCH == (3, 0)


def test_the_tested_version_is_the_one_ci_installs_and_the_readme_names():
    setup = (ROOT / "scripts" / "setup-venv.sh").read_text()
    assert f'"torch=={versions.TESTED_TORCH_CPU}"' in setup
    readme = (ROOT / "README.md").read_text()
    assert f"torch {versions.TESTED_TORCH_CPU}" in readme and versions.REQUIREMENT in readme


def test_the_running_torch_is_admitted():
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        versions.check_torch(torch.__version__, environ={})
