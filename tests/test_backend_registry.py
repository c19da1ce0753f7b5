"""The backend registry (``backends.PRIMITIVE_BACKENDS``): the one list of primitive backends that
dispatch, ``available_backends``, the trainer's checks and the tests read."""

from __future__ import annotations

import types
import warnings
from dataclasses import replace

import pytest
import torch

from fastrl_kernels import backends, config
from fastrl_kernels.backends import PRIMITIVE_BACKENDS, available_backends, resolve_backend
from fastrl_kernels.trainer.algos import TrainConfig
from fastrl_kernels.trainer.cli import config_problem

CPU = torch.device("cpu")


def test_config_names_are_the_registry_between_auto_and_reference():
    assert tuple(PRIMITIVE_BACKENDS) == ("torch", "native", "triton")
    assert config.BACKENDS == ("auto", *PRIMITIVE_BACKENDS, "reference")
    for name, spec in PRIMITIVE_BACKENDS.items():
        assert spec.name == name and spec.note


@pytest.mark.parametrize("name", list(PRIMITIVE_BACKENDS))
def test_each_usable_backend_loads_a_module_with_the_primitives(name):
    spec = PRIMITIVE_BACKENDS[name]
    if not spec.usable(CPU):
        pytest.skip(f"{name} does not run on CPU in this process")
    module = backends.primitives(name)
    assert module is spec.load()
    assert callable(module.stats) and callable(module.grad)
    assert resolve_backend(name, CPU) == name


def test_a_module_without_the_primitives_is_refused(monkeypatch):
    empty = types.ModuleType("not_a_backend")
    empty.stats = lambda *args: None
    monkeypatch.setitem(PRIMITIVE_BACKENDS, "torch", replace(PRIMITIVE_BACKENDS["torch"], load=lambda: empty))
    with pytest.raises(TypeError, match=r"^backend 'torch': module not_a_backend does not provide the primitives grad"):
        backends._import_primitives("torch")


def test_reference_has_no_primitives():
    expected = r"^backend: expected one of \('torch', 'native', 'triton'\) here, got 'reference'$"
    with pytest.raises(ValueError, match=expected):
        backends._import_primitives("reference")
    assert resolve_backend("reference", CPU) == "reference"


def test_available_backends_lists_torch_reference_then_the_usable_others():
    for device in ("cpu", "meta"):
        usable = [name for name, spec in PRIMITIVE_BACKENDS.items() if spec.usable(torch.device(device))]
        names = available_backends(device)
        assert names[:2] == ["torch", "reference"] and sorted(names) == sorted(["reference", *usable])
    assert "native" not in available_backends("meta")


def test_auto_falls_back_to_torch_with_one_warning_at_the_caller(monkeypatch):
    monkeypatch.setitem(PRIMITIVE_BACKENDS, "native", replace(PRIMITIVE_BACKENDS["native"], usable=lambda d: False))
    monkeypatch.setattr(backends, "_warned_native_fallback", False)
    with pytest.warns(RuntimeWarning, match="native C\\+\\+ CPU backend could not be built") as record:
        assert resolve_backend("auto", CPU) == "torch"
    assert len(record) == 1 and record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", CPU) == "torch"
        assert resolve_backend("auto", torch.device("meta")) == "torch"


def test_auto_on_cpu_is_native_when_it_builds():
    if not PRIMITIVE_BACKENDS["native"].usable(CPU):
        pytest.skip("the native extension cannot be built here")
    assert resolve_backend("auto", CPU) == "native"


def test_a_backend_off_its_devices_is_refused(monkeypatch):
    with pytest.raises(RuntimeError, match=r"^backend='native': runs on CPU tensors only; got a tensor on meta$"):
        resolve_backend("native", torch.device("meta"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"^backend='triton': needs a CUDA tensor and the triton package"):
            resolve_backend("triton", CPU)


def test_trainer_refuses_a_backend_off_its_devices(monkeypatch):
    assert config_problem(TrainConfig(backend="triton", device="cpu")) == (
        "--backend triton: expected --device cuda (Triton kernels run on the GPU)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config_problem(TrainConfig(backend="native", device="cuda")) == (
        "--backend native: expected --device cpu (the C++ kernels run on the CPU)")
    assert config_problem(TrainConfig(backend="torch", device="cuda")) is None
