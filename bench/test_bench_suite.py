"""pytest-benchmark over the same cases as ``fastrl-bench``, for regression tracking.

    pytest bench/ --benchmark-only                                   # smallest quick shape per op
    FASTRL_BENCH_SHAPES=4096x32000 pytest bench/ --benchmark-only --benchmark-json out.json
    FASTRL_BENCH_DEVICE=cuda FASTRL_BENCH_DTYPE=bf16 pytest bench/ --benchmark-only

Not part of the default test run (``pytest`` collects ``tests/`` only). Environment variables:
``FASTRL_BENCH_DEVICE`` (default cuda when available, else cpu), ``FASTRL_BENCH_DTYPE`` (float32),
``FASTRL_BENCH_SHAPES`` (comma-separated NxV / NxVxH; default the first quick shape of each op),
``FASTRL_BENCH_COMPILE`` (auto | on | off), ``FASTRL_BENCH_ROUNDS`` (5). Memory is not measured here
(``fastrl-bench`` does that in a fresh process); each benchmark records shape, dtype and device.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fastrl_kernels.benchmarks.cases import Unavailable, canonical_dtype, families, shape_label  # noqa: E402
from fastrl_kernels.benchmarks.runner import _shapes_for, unavailable_reason  # noqa: E402

DEVICE = os.environ.get("FASTRL_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = canonical_dtype(os.environ.get("FASTRL_BENCH_DTYPE", "float32"))
COMPILE = os.environ.get("FASTRL_BENCH_COMPILE", "auto")
ROUNDS = int(os.environ.get("FASTRL_BENCH_ROUNDS", "5"))


def _params() -> list:
    shapes = [s for s in os.environ.get("FASTRL_BENCH_SHAPES", "").split(",") if s.strip()]
    device_type = torch.device(DEVICE).type
    params = []
    for family in families().values():
        chosen = _shapes_for(family, shapes, device_type, quick=True) if shapes else \
            family.default_shapes(device_type, True)[:1]
        for shape in chosen:
            for case in family.make_cases(shape, DTYPE, DEVICE):
                for impl in case.impls:
                    label = f"{case.name}-{'x'.join(map(str, shape.values()))}-{impl}"
                    params.append(pytest.param(case, impl, id=label))
    return params


@pytest.mark.parametrize(("case", "impl"), _params())
def test_bench(benchmark, case, impl):
    reason = unavailable_reason(impl, case.device, COMPILE)
    if reason:
        pytest.skip(reason)
    try:
        step = case.setup(case, impl)
    except Unavailable as error:
        pytest.skip(str(error))
    if torch.device(case.device).type == "cuda":
        inner = step

        def step():
            inner()
            torch.cuda.synchronize()

    step()  # warm-up: compiles, loads libraries, faults pages in; not timed
    benchmark.group = f"{case.name} {shape_label(case.shape)} {case.dtype} {case.device}"
    benchmark.extra_info.update(
        {"case": case.name, "impl": impl, "shape": dict(case.shape), "dtype": case.dtype, "device": case.device,
         "traffic_bytes": case.traffic_bytes, "torch": torch.__version__}
    )
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=0)
