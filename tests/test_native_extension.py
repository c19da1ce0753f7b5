"""The native extension around its two primitives: building and loading (nothing built at import, a missing
compiler reported, the build command, the first build said on stderr), the instruction-set override, input
checks, one vs two threads, and a large fresh gradient buffer on huge pages.

The autouse fixture of ``tests/test_native_primitives.py`` builds (or loads) the extension first.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastrl_kernels import native
from fastrl_kernels.core import CoreParams
from fastrl_kernels.testing.strategies import IGNORE_INDEX, make_logits
from tests.test_backend_contract import coefficients
from tests.test_native_primitives import _built_extension  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.native


def test_same_result_for_one_and_two_threads():
    logits = make_logits("normal", (301, 2999), seed=8)
    targets = torch.randint(0, 2999, (301,))
    params = CoreParams(temperature=0.7, softcap=30.0)
    g_lp, g_entropy = coefficients(301, 4)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            stats = native.stats(logits, targets, params, with_log_sum_p2=True)
            results.append((stats, native.grad(logits, targets, stats, g_lp, g_entropy, params)))
    finally:
        torch.set_num_threads(before)
    (s1, g1), (s2, g2) = results
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))
    assert torch.equal(g1, g2)


def test_bad_inputs_raise():
    logits = torch.randn(4, 10)
    targets = torch.tensor([0, 9, IGNORE_INDEX, 3])
    stats = native.stats(logits, targets, CoreParams())
    g = torch.ones(4)
    with pytest.raises(RuntimeError, match="targets"):
        native.stats(logits, torch.tensor([0, 10, 1, 2]), CoreParams())
    with pytest.raises(RuntimeError, match="stride"):
        native.stats(torch.randn(10, 4).t(), targets, CoreParams())
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        native.stats(logits.to(torch.int32), targets, CoreParams())  # float64 runs on a float32 copy
    with pytest.raises(RuntimeError, match="out"):
        native.grad(logits, targets, stats, g, g, CoreParams(), out=torch.empty(4, 10, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="softcap"):
        native.stats(logits, targets, CoreParams(softcap=0.0))


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_import_builds_nothing_and_missing_compiler_is_reported(tmp_path):
    code = (
        "import fastrl_kernels.native as n\n"
        "assert n._module is None and n._error is None\n"
        "assert n.is_available() is False\n"
        "try:\n    n.load()\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    )
    result = _run_python(code, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "ERR fastrl_kernels.native: the C++ extension could not be built" in result.stdout


def test_build_command_prints_the_build_directory():
    result = subprocess.run(
        [sys.executable, "-m", "fastrl_kernels.native", "build"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert str(native.build_directory()) in result.stdout


def test_unknown_forced_instruction_set_is_refused(monkeypatch):
    monkeypatch.setenv("FASTRL_NATIVE_ISA", "sse9")
    with pytest.raises(ValueError, match="FASTRL_NATIVE_ISA: expected one of avx512, avx2, generic, got 'sse9'"):
        native.isa()


def test_large_fresh_gradient_buffer_on_huge_pages_matches_torch_backend():
    # >= 64 MiB: native.grad advises transparent huge pages on its fresh output (a page-fault saving
    # only); the values must be those of the portable backend.
    from fastrl_kernels import torch_backend

    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2048, 8209, generator=g) * 4
    targets = torch.randint(0, 8209, (2048,), generator=g)
    params = CoreParams(temperature=0.9)
    g_lp, g_entropy = torch.randn(2048, generator=g), torch.randn(2048, generator=g)
    got = native.grad(logits, targets, native.stats(logits, targets, params), g_lp, g_entropy, params)
    want = torch_backend.grad(logits, targets, torch_backend.stats(logits, targets, params), g_lp, g_entropy, params)
    assert got.numel() * got.element_size() >= 64 << 20
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert isinstance(native.load().advise_huge_pages(got), bool)


def test_first_build_says_so_on_stderr_and_later_loads_do_not(monkeypatch, tmp_path, capsys):
    import torch.utils.cpp_extension

    from fastrl_kernels import native

    built = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kwargs: built.append(kwargs) or "module")
    monkeypatch.setattr(native, "build_directory", lambda: tmp_path / "build")
    assert native._build() == "module"
    first = capsys.readouterr().err
    assert "compiling the C++ backend" in first and str(tmp_path / "build") in first
    assert native._build() == "module"
    assert capsys.readouterr().err == ""
    assert len(built) == 2  # torch's own up-to-date check still runs every time
    (tmp_path / "build" / "fastrl_sources.sha256").write_text("an older source tree")
    native._build()
    assert "compiling the C++ backend" in capsys.readouterr().err
