"""``run_suite``: every selected op family x shape x implementation, as a list of result dicts.

Callable from Python (``bench/gpu_suite.py`` uses it on a GPU)::

    from fastrl_kernels.benchmarks.runner import run_suite, environment
    results = run_suite(device="cuda", ops=["policy_loss"], shapes=["16384x151936"], dtype="bfloat16")

On CPU each op family runs in a fresh subprocess (``probe.py``, see ``measure.py`` for why); on
CUDA everything runs in this process. Implementations that cannot run are recorded with
``status="skipped"`` and a reason, printed once.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from typing import Any, Optional, Union

import torch

from . import measure, naive, peers
from .cases import NAIVE, NAIVE_COMPILE, OpFamily, Unavailable, canonical_dtype, families, parse_ours, parse_shape
from .cases import shape_label as _shape_label
from .probe import MARKER, measure_pairs, shape_key

Log = Callable[[str], None]
ShapeArg = Union[str, Mapping[str, int]]


def unavailable_reason(impl: str, device: str, compile_mode: str = "auto") -> Optional[str]:
    """Why ``impl`` cannot run on ``device`` (None: try it). Unknown names are left to their setup."""
    dev = torch.device(device)
    if impl == NAIVE_COMPILE:
        if compile_mode == "off":
            return "torch.compile'd naive: off (--compile off)"
        if compile_mode == "auto" and dev.type == "cpu":
            return ("torch.compile'd naive: skipped on CPU by default (inductor builds C++ for every shape, "
                    "minutes on 2 cores); pass --compile on to include it")
        reason = naive.compile_available(device)
        return None if reason is None else f"torch.compile'd naive: {reason}"
    try:
        if impl == "trl":
            peers.trl_logprobs()
        elif impl.startswith("liger"):
            peers.liger_grpo_loss()
    except Unavailable as error:
        return str(error)
    parsed = parse_ours(impl)
    if parsed is not None:
        from ..backends import available_backends

        backends = available_backends(dev)
        if parsed[0] != "auto" and parsed[0] not in backends:
            return f"{impl}: backend {parsed[0]!r} is not available on {dev.type} (available: {backends})"
    return None


def _shapes_for(family: OpFamily, shapes: Optional[Sequence[ShapeArg]], device_type: str, quick: bool):
    if not shapes:
        return family.default_shapes(device_type, quick)
    chosen = []
    for shape in shapes:
        if isinstance(shape, Mapping):
            if set(shape) == set(family.shape_keys):
                chosen.append(dict(shape))
        elif len(shape.lower().split("x")) == len(family.shape_keys):
            chosen.append(parse_shape(shape, family.shape_keys))
    return chosen


def _key(shape: Mapping[str, int], case: str, impl: str) -> tuple[str, str, str]:
    return shape_key(shape), case, impl


def _progress(log: Log) -> Callable[[dict[str, Any]], None]:
    def emit(record: dict[str, Any]) -> None:
        where = f"  {record['case']} {_shape_label(record['shape'])} {record['impl']}"
        if record["status"] != "ok":
            log(f"{where}: {record['status']}: {record.get('reason', '')}")
        elif record["phase"] == "time":
            log(f"{where}: {record['time_ms']:.2f} ms")
        else:
            peak = record.get("peak_extra_bytes")
            log(f"{where}: peak extra {'n/a' if peak is None else f'{peak / 1e6:.1f} MB'}")

    return emit


def _run_isolated(request: dict[str, Any], emit: Callable[[dict[str, Any]], None], log: Log) -> list[dict]:
    """Runs ``probe`` in a fresh interpreter; returns its records (errors for items it never finished)."""
    records: dict[tuple[str, str, str], dict[str, Any]] = {}
    with tempfile.TemporaryFile(mode="w+") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "fastrl_kernels.benchmarks.probe"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
        process.stdin.write(json.dumps(request))
        process.stdin.close()
        for line in process.stdout:
            if not line.startswith(MARKER):
                continue
            record = json.loads(line[len(MARKER):])
            emit(record)
            key = _key(record["shape"], record["case"], record["impl"])
            if record.pop("phase") == "time":
                records[key] = record
            else:
                target = records.setdefault(key, {"status": "error", "reason": "no timing"})
                if record["status"] == "ok":
                    target["peak_extra_bytes"] = record["peak_extra_bytes"]
                else:
                    target["memory_error"] = record["reason"]
        code = process.wait()
        stderr.seek(0)
        tail = stderr.read()[-400:].strip()
    if code != 0:
        why = "killed (out of memory?)" if code < 0 else f"exit code {code}"
        log(f"  measurement process {why}: {tail.splitlines()[-1] if tail else ''}")
    results = []
    for shape, case_name, impl in request["items"]:
        record = records.setdefault(_key(shape, case_name, impl), {})
        if "status" not in record:
            record.update(status="error", reason=f"measurement process ended first ({code})")
        elif record["status"] == "ok" and "peak_extra_bytes" not in record and "memory_error" not in record:
            record["memory_error"] = f"measurement process ended first ({code})"
        results.append({**record, "shape": shape, "case": case_name, "impl": impl})
    return results


def _add_derived(rows: list[dict[str, Any]], bandwidth: float) -> None:
    naive_rows = {(r["case"], json.dumps(r["shape"])): r for r in rows if r["impl"] == NAIVE and r["status"] == "ok"}
    for row in rows:
        if row["status"] != "ok":
            continue
        seconds = row["time_ms"] / 1e3
        if row["traffic_bytes"]:
            row["gbps"] = row["traffic_bytes"] / seconds / 1e9
            row["pct_copy_bandwidth"] = 100.0 * row["gbps"] / bandwidth
        peak = row.get("peak_extra_bytes")
        row["peak_extra_mb"] = None if peak is None else peak / 1e6
        base = naive_rows.get((row["case"], json.dumps(row["shape"])))
        if base is None:
            continue
        row["speedup_vs_naive"] = base["time_ms"] / row["time_ms"]
        base_peak = base.get("peak_extra_bytes")
        if peak is not None and base_peak:
            row["memory_vs_naive"] = peak / base_peak


def run_suite(
    device: str = "cpu",
    ops: Optional[Sequence[str]] = None,
    shapes: Optional[Sequence[ShapeArg]] = None,
    dtype: str = "float32",
    quick: bool = False,
    *,
    impls: Optional[Sequence[str]] = None,
    compile_mode: str = "auto",
    warmup: Optional[int] = None,
    repeats: Optional[int] = None,
    max_seconds: Optional[float] = None,
    isolate: Optional[bool] = None,
    log: Log = print,
) -> list[dict[str, Any]]:
    """Measure the suite; one dict per (op case, shape, implementation), skipped ones included.

    Args:
        device: "cpu" or "cuda" (or "cuda:K").
        ops: family names (``token_logprobs``, ``policy_loss``, the lm_head ones); None = all.
        shapes: ``"NxV"`` / ``"NxVxH"`` strings or shape dicts; each family takes those with its letters.
            None = the family's defaults for the device (``quick`` picks the small set).
        dtype: "float32" | "bfloat16" | "float16" (aliases fp32, bf16, fp16).
        impls: keep only these implementation names (``naive`` is always kept: the ratios need it).
        compile_mode: "auto" (torch.compile'd naive on CUDA only), "on", "off".
        warmup, repeats, max_seconds: per implementation (defaults: 1, 3 quick / 5, 15 s quick / 60 s).
        isolate: run each op family in a subprocess; default True on CPU, False on CUDA.

    Returns:
        Dicts with op, case, variant, impl, status ("ok" | "skipped" | "error"), reason, shape, N, V
        (H), dtype, device, params, time_ms (median), times_ms, peak_extra_bytes / peak_extra_mb,
        grad_bytes, traffic_bytes, gbps, pct_copy_bandwidth, copy_gbps, speedup_vs_naive (naive time /
        this time) and memory_vs_naive (this peak / naive peak).
    """
    dev = torch.device(device)
    dtype = canonical_dtype(dtype)
    isolate = dev.type == "cpu" if isolate is None else isolate
    warmup = 1 if warmup is None else warmup
    repeats = (3 if quick else 5) if repeats is None else repeats
    max_seconds = (15.0 if quick else 60.0) if max_seconds is None else max_seconds
    known = families()
    selected = list(known) if not ops else list(ops)
    unknown = [op for op in selected if op not in known]
    if unknown:
        raise ValueError(f"ops: unknown {unknown}; available: {sorted(known)}")
    bandwidth = measure.copy_bandwidth(device)
    log(f"copy bandwidth on {device}: {bandwidth:.1f} GB/s (read + write of a large fp32 tensor)")
    reasons: dict[str, Optional[str]] = {}
    rows: list[dict[str, Any]] = []
    for op in selected:
        family = known[op]
        family_shapes = _shapes_for(family, shapes, dev.type, quick)
        if not family_shapes:
            log(f"skip: {op}: no shape given as {'x'.join(family.shape_keys)} in --shapes")
            continue
        items, family_rows = [], []
        for shape in family_shapes:
            for case in family.make_cases(shape, dtype, device):
                for impl in case.impls:
                    if impls and impl != NAIVE and impl not in impls:
                        continue
                    if impl not in reasons:
                        reasons[impl] = unavailable_reason(impl, device, compile_mode)
                        if reasons[impl]:
                            log(f"skip: {reasons[impl]}")
                    row = {
                        "op": op, "case": case.name, "variant": case.name.split("/", 1)[-1], "impl": impl,
                        "shape": dict(case.shape), **case.shape, "dtype": dtype, "device": device,
                        "params": dict(case.params), "grad_bytes": case.grad_bytes,
                        "traffic_bytes": case.traffic_bytes, "copy_gbps": bandwidth,
                    }
                    if reasons[impl]:
                        row.update(status="skipped", reason=reasons[impl])
                    else:
                        items.append((dict(case.shape), case.name, impl))
                    family_rows.append(row)
        log(f"{op} {dtype} {device}: {len(items)} measurements over {len(family_shapes)} shapes")
        request = {"op": op, "dtype": dtype, "device": device, "items": items,
                   "warmup": warmup, "repeats": repeats, "max_seconds": max_seconds}
        if isolate:
            records = _run_isolated(request, _progress(log), log)
        else:
            records = measure_pairs(op, dtype, device, items, warmup=warmup, repeats=repeats,
                                    max_seconds=max_seconds, emit=_progress(log))
        by_item = {_key(r["shape"], r["case"], r["impl"]): r for r in records}
        for row in family_rows:
            record = by_item.get(_key(row["shape"], row["case"], row["impl"]))
            if record is not None:
                row.update({k: v for k, v in record.items() if k not in ("shape", "case", "impl")})
        _add_derived(family_rows, bandwidth)
        rows.extend(family_rows)
    return rows


def environment(device: str = "cpu", command: Optional[str] = None) -> dict[str, Any]:
    """Date, command, versions, device and methods, stored with every result file."""
    dev = torch.device(device)
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for distribution in ("fastrl-kernels", "numpy", "triton"):
        try:
            versions[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    versions.update(peers.peer_versions())
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        versions["cuda"] = torch.version.cuda or "?"
    else:
        name = _cpu_name()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command if command is not None else " ".join(["fastrl-bench"] + sys.argv[1:]),
        "device": device,
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "versions": versions,
        "timing": "median of repeats after warm-up (CUDA events on GPU, perf_counter on CPU)",
        "memory": measure.memory_method(device),
        "gbps": "essential logits bytes read + written per step / median time",
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
