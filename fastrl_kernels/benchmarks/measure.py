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

Peak extra memory inside a running program (the trainer's loss step): ``StepMemory``, the allocator's
count on CUDA and, on CPU, the live tensor storages created inside the block (``StoragePeak``).

Bandwidth: ``copy_bandwidth`` (a large-tensor copy, the measured yardstick) and ``hbm_peak_tbps``
(the data-sheet peak of known GPUs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
import weakref
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_M_MMAP_THRESHOLD = -3
EXACT_MMAP_THRESHOLD = 64 * 1024
_exact_rss_ready: Optional[bool] = None


def time_step(
    step: Callable[[], Any], device: str, *, warmup: int = 1, repeats: int = 5, max_seconds: float = 30.0
) -> list[float]:
    """Milliseconds of each timed call (at least one; stops early once ``max_seconds`` are spent).

    ``perf_counter`` around each call on CPU, ``cuda_event_times`` on CUDA."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return cuda_event_times(step, warmup=warmup, repeats=repeats, max_seconds=max_seconds, device=dev)
    for _ in range(warmup):
        step()
    times: list[float] = []
    started = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - started > max_seconds:
            break
    return times


def cuda_event_times(
    step: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, max_seconds: float = float("inf"),
    device: Optional[torch.device] = None,
) -> list[float]:
    """Milliseconds of each call by a pair of CUDA events, read after one synchronize at the end;
    ``warmup`` untimed calls first (compiles, first allocations)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize(device)
    events = []
    started = time.perf_counter()
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        events.append((begin, end))
        if time.perf_counter() - started > max_seconds:
            break
    torch.cuda.synchronize(device)
    return [begin.elapsed_time(end) for begin, end in events]


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


class CudaAllocatorPeak:
    """``with CudaAllocatorPeak(device) as meter: ...`` sets ``meter.peak``: the bytes
    ``torch.cuda.max_memory_allocated`` rose above ``torch.cuda.memory_allocated`` on entry."""

    def __init__(self, device: Union[str, torch.device] = "cuda"):
        self.device = torch.device(device)
        self.peak = 0

    def __enter__(self) -> CudaAllocatorPeak:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)


def cuda_peak_extra(step: Callable[[], Any], device: Union[str, torch.device] = "cuda") -> int:
    """Bytes ``torch.cuda.max_memory_allocated`` rises above the allocation before one call."""
    gc.collect()
    with CudaAllocatorPeak(device) as meter:
        step()
    return meter.peak


class StoragePeak(TorchDispatchMode):
    """Counts the bytes of tensor storages created while active and still alive; keeps the peak in
    ``self.peak``. Seen at the dispatcher, in this process: inputs that existed before are not counted,
    scratch memory a kernel takes without making a tensor is not seen (the RSS method sees both)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place results share an input's storage: not new memory (the input may predate us).
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._seen or key in inputs:
                continue
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


class StepMemory:
    """Peak extra bytes of the block it wraps, as ``self.peak``, measured in process (a training loop).

    CUDA: ``CudaAllocatorPeak`` (the allocator's own count, everything included). CPU: ``StoragePeak``,
    the peak total size of tensor storages created inside the block and alive at the same time.
    """

    def __init__(self, device: Union[str, torch.device]):
        self.device = torch.device(device)
        self.peak = 0

    def __enter__(self) -> StepMemory:
        meter = CudaAllocatorPeak(self.device) if self.device.type == "cuda" else StoragePeak()
        self._meter = meter.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._meter.__exit__(*exc)
        self.peak = self._meter.peak


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

# HBM bandwidth in TB/s by device-name fragment, most specific first (the vendors' data-sheet peaks).
HBM_PEAK_TBPS = (
    ("GH200", 4.0),
    ("H200", 4.8),
    ("H100 NVL", 3.9),
    ("H100 PCIe", 2.0),
    ("H100", 3.35),
    ("A100-SXM4-80GB", 2.039),
    ("A100 80GB PCIe", 1.935),
    ("A100", 1.555),
    ("L40S", 0.864),
)


def hbm_peak_tbps(device_name: str) -> Optional[float]:
    """The data-sheet HBM bandwidth of a device by its name (``torch.cuda.get_device_name``); None if unknown."""
    for fragment, tbps in HBM_PEAK_TBPS:
        if fragment in device_name:
            return tbps
    return None


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
