"""Measures (shape, case, implementation) items of one op family, in this process.

``measure_pairs`` first times every pair (default allocator settings, warm-up calls first), then
measures each pair's peak extra memory in one more call (see ``measure.py``): libraries, thread
pools and compiled code were loaded by the timing phase of the same process (so would a buffer an
implementation kept across calls; none of this package's does). Each pair builds its own inputs and
drops them afterwards.
The suite calls it in-process on CUDA and, on CPU, in a fresh subprocess per op family::

    echo '{"op": ..., "dtype": ..., "device": ..., "items": [[shape, case, impl], ...]}' \\
        | python -m fastrl_kernels.benchmarks.probe

which prints one line per finished measurement: ``@@fastrl-bench {json}``.
"""

from __future__ import annotations

import gc
import json
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import measure
from .cases import NAIVE_COMPILE, BenchCase, Unavailable, families

MARKER = "@@fastrl-bench "


def _free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _failure(error: BaseException) -> dict[str, Any]:
    if isinstance(error, Unavailable):
        return {"status": "skipped", "reason": str(error)}
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        text = "out of memory: " + text
    return {"status": "error", "reason": text}


def _time_pair(case: BenchCase, impl: str, warmup: int, repeats: int, max_seconds: float) -> dict[str, Any]:
    step = None
    try:
        step = case.setup(case, impl)
        times = measure.time_step(step, case.device, warmup=warmup, repeats=repeats, max_seconds=max_seconds)
        return {"status": "ok", "times_ms": [round(t, 4) for t in times], "time_ms": measure.median(times)}
    except Exception as error:  # one failing implementation must not end the suite
        if not isinstance(error, Unavailable) and "--debug" in sys.argv:
            traceback.print_exc()
        return _failure(error)
    finally:
        del step
        _free(case.device)


def _memory_pair(case: BenchCase, impl: str) -> dict[str, Any]:
    step = None
    try:
        step = case.setup(case, impl)
        if impl == NAIVE_COMPILE:
            step()  # a new compiled wrapper may re-trace once; that is compile memory, not the step's
        return {"status": "ok", "peak_extra_bytes": measure.peak_extra(step, case.device)}
    except Exception as error:
        return _failure(error)
    finally:
        del step
        _free(case.device)


def shape_key(shape: Mapping[str, int]) -> str:
    return "x".join(f"{k}{v}" for k, v in shape.items())


def measure_pairs(
    op: str,
    dtype: str,
    device: str,
    items: list[tuple[Mapping[str, int], str, str]],
    *,
    warmup: int = 1,
    repeats: int = 5,
    max_seconds: float = 30.0,
    emit: Callable[[dict[str, Any]], None] = lambda record: None,
) -> list[dict[str, Any]]:
    """Measures ``items`` = (shape, case name, impl) of family ``op``.

    Returns one record per item: shape, case, impl, status ("ok" | "skipped" | "error"), reason,
    time_ms, times_ms, peak_extra_bytes. ``emit`` sees each record as soon as its timing and then
    its memory are known (``phase`` "time" / "memory").
    """
    family = families()[op]
    cases: dict[tuple[str, str], BenchCase] = {}
    for shape, _, _ in items:
        for case in family.make_cases(dict(shape), dtype, device):
            cases[(shape_key(shape), case.name)] = case
    records = []
    for shape, case_name, impl in items:
        record = {"shape": dict(shape), "case": case_name, "impl": impl}
        record.update(_time_pair(cases[(shape_key(shape), case_name)], impl, warmup, repeats, max_seconds))
        emit({**record, "phase": "time"})
        records.append(record)
    for record in records:
        if record["status"] != "ok":
            continue
        memory = _memory_pair(cases[(shape_key(record["shape"]), record["case"])], record["impl"])
        if memory["status"] == "ok":
            record["peak_extra_bytes"] = memory["peak_extra_bytes"]
        else:
            record["memory_error"] = memory["reason"]
        emit({"shape": record["shape"], "case": record["case"], "impl": record["impl"], "phase": "memory", **memory})
    return records


def main() -> None:
    request = json.load(sys.stdin)

    def emit(record: dict[str, Any]) -> None:
        print(MARKER + json.dumps(record), flush=True)

    measure_pairs(
        request["op"], request["dtype"], request["device"], [tuple(item) for item in request["items"]],
        warmup=request.get("warmup", 1), repeats=request.get("repeats", 5),
        max_seconds=request.get("max_seconds", 30.0), emit=emit,
    )


if __name__ == "__main__":
    main()
