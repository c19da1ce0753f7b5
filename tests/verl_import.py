"""verl 0.9.1's ``core_algos`` for the parity tests (the ``core_algos`` fixture of the verl test files).

verl's package ``__init__`` imports ray and its tracking module orjson, neither used by the loss
functions: when they are missing, empty stand-ins are put in ``sys.modules`` for the import and removed
after it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def import_core_algos():
    """``verl.trainer.ppo.core_algos``, or skip the calling test when verl is not installed."""
    if importlib.util.find_spec("verl") is None:
        pytest.skip("verl parity tests need `pip install --no-deps verl==0.9.1` (+ light deps)")
    stand_ins = {}
    for name in ("ray", "orjson"):
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.ObjectRef = object
            stand_ins[name] = sys.modules[name] = module
    try:
        return importlib.import_module("verl.trainer.ppo.core_algos")
    except ImportError as error:
        pytest.skip(f"verl.trainer.ppo.core_algos does not import here: {error}")
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
