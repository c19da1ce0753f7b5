"""How one step is measured: time, peak extra memory, and the copy bandwidth used as the roofline.

Time: the median of ``repeats`` calls after ``warmup`` calls that are not timed (first calls load
libraries, compile, fault pages in). CPU: ``time.perf_counter`` around each call. CUDA: a pair of CUDA
events around each call, read after one synchronize at the end.

Peak extra memory on CUDA: ``torch.cuda.max_memory_allocated`` during one call minus
``torch.cuda.memory_allocated`` just before it (the inputs, already allocated).

Peak extra memory on CPU (Linux): the resident-set high-water mark. Before the measured call the
process fixes glibc's mmap threshold at 64 KiB (``mallopt(M_MMAP_THRESHOLD)``), so every buffer of
64 KiB or more is its own mapping, returned to the OS when freed instead of being kept in the heap
where a later call could reuse it unseen; ``malloc_trim(0)`` then returns free heap pages, the
baseline is ``VmRSS`` (inputs allocated and touched), and writing ``5`` to ``/proc/self/clear_refs``
resets ``VmHWM`` to it. Peak extra = ``VmHWM`` after the call - baseline. This counts pages actually
touched, whoever allocated them (PyTorch, a C++ extension, OpenMP), which a tracking allocator would
miss; its resolution is that of the kernel's per-CPU page counters (about 0.25 MB on 2 CPUs), so
rows far below 1 MB read as noise. Because the mmap threshold slows small allocations, times are
always taken before it is changed; the suite runs each op family in a fresh subprocess
(``probe.py``), so nothing from an earlier allocator setting or another family leaks in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

_M_MMAP_THRESHOLD = -3
EXACT_MMAP_THRESHOLD = 64 * 1024
_exact_rss_ready: Optional[bool] = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(
    step: Callable[[], Any], device: str, *, warmup: int = 1, repeats: int = 5, max_seconds: float = 30.0
) -> list[float]:
    """Milliseconds of each timed call (at least one; stops early once ``max_seconds`` are spent)."""
    dev = torch.device(device)
    for _ in range(warmup):
        step()
    _synchronize(dev)
    times: list[float] = []
    started = time.perf_counter()
    if dev.type == "cuda":
        events = []
        for _ in range(repeats):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            events.append((begin, end))
            if time.perf_counter() - started > max_seconds:
                break
        torch.cuda.synchronize(dev)
        return [begin.elapsed_time(end) for begin, end in events]
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - started > max_seconds:
            break
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------------------------------------
# memory


def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def prepare_exact_rss() -> bool:
    """Fix the mmap threshold (see the module docstring); True when the RSS method can run here."""
    global _exact_rss_ready
    if _exact_rss_ready is None:
        libc = _libc()
        ok = libc is not None and hasattr(libc, "mallopt") and _status_kib("VmHWM") is not None
        ok = ok and libc.mallopt(_M_MMAP_THRESHOLD, EXACT_MMAP_THRESHOLD) == 1 and _reset_hwm()
        _exact_rss_ready = bool(ok)
    return _exact_rss_ready


def cpu_memory_method() -> str:
    return (
        "RSS high-water mark (VmHWM reset via /proc/self/clear_refs) minus VmRSS after inputs, "
        f"glibc mmap threshold fixed at {EXACT_MMAP_THRESHOLD // 1024} KiB, malloc_trim before the baseline"
    )


def cpu_peak_extra(step: Callable[[], Any]) -> Optional[int]:
    """Bytes of resident memory one call adds at its peak (None where the RSS method is unavailable)."""
    if not prepare_exact_rss():
        return None
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    baseline = _status_kib("VmRSS")
    _reset_hwm()
    step()
    peak = _status_kib("VmHWM")
    if baseline is None or peak is None:
        return None
    return max(0, peak - baseline) * 1024


def cuda_peak_extra(step: Callable[[], Any], device: str) -> int:
    """Bytes ``torch.cuda.max_memory_allocated`` rises above the allocation before one call."""
    dev = torch.device(device)
    gc.collect()
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    baseline = torch.cuda.memory_allocated(dev)
    step()
    torch.cuda.synchronize(dev)
    return max(0, torch.cuda.max_memory_allocated(dev) - baseline)


def peak_extra(step: Callable[[], Any], device: str) -> Optional[int]:
    if torch.device(device).type == "cuda":
        return cuda_peak_extra(step, device)
    return cpu_peak_extra(step)


def memory_method(device: str) -> str:
    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated during one call minus torch.cuda.memory_allocated before it"
    return cpu_memory_method()


# ---------------------------------------------------------------------------------------------
# bandwidth


def copy_bandwidth(device: str, nbytes: Optional[int] = None, repeats: int = 5) -> float:
    """GB/s of ``dst.copy_(src)`` on a large fp32 tensor (bytes read + written / median time).

    256 MiB on CPU (far past the last-level cache), 1 GiB on CUDA.
    """
    dev = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if dev.type == "cuda" else (1 << 28)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    times = time_step(lambda: dst.copy_(src), device, warmup=2, repeats=repeats, max_seconds=10.0)
    return 2 * nbytes / (median(times) / 1e3) / 1e9
