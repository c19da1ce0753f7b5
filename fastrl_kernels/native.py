"""Native C++ CPU backend of the two primitives of ``core.py`` (docs/design.md, "Backends and builds").

The C++ sources (``csrc/`` at the repository root, or ``fastrl_kernels/csrc/`` in an installed
package) are compiled on first use with ``torch.utils.cpp_extension.load`` (ninja) and cached in
torch's extensions directory, in a folder named after the Python, torch, ISA and a digest of the
sources (``build_directory``); nothing happens at import. ``python -m fastrl_kernels.native build``
prebuilds and prints where the build lives. Builds and loads are locked across processes and refused
in a folder that other users can write (``native_cache``).

Rows run in parallel (OpenMP through ``at::parallel_for``, so ``torch.set_num_threads`` applies);
one row is one task, so results do not depend on the thread count. Inner loops use 16-lane AVX-512F
when the CPU has it, else AVX2/FMA/F16C, else portable scalar code (each build cached under its own
name; the 16-lane loops take ~0.6 of the AVX2 time on a 2-core Xeon, bench/results/cpu_pass_structure.md).
Set ``FASTRL_NATIVE_ISA`` to ``avx512``, ``avx2`` or ``generic`` to force one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from . import native_cache
from .core import CoreParams, CoreStats, float64_on_float32_rows

_SOURCES = ("native.cpp",)
_HEADERS = ("row_kernels.h", "simd.h")
_AVX2_FLAGS = ("avx2", "fma", "f16c")
_AVX512_FLAGS = _AVX2_FLAGS + ("avx512f",)
# Each build and the CPU flags it needs, widest first.
_ISA_FLAGS = {"avx512": _AVX512_FLAGS, "avx2": _AVX2_FLAGS, "generic": ()}
ISAS = tuple(_ISA_FLAGS)

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_error: Optional[str] = None


def source_dir() -> Optional[Path]:
    """The directory holding the C++ sources: inside the package when shipped, else the repo's csrc/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if all((candidate / name).is_file() for name in _SOURCES + _HEADERS):
            return candidate
    return None


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported_isas() -> tuple:
    """The builds this CPU can run, widest first (always ends with "generic")."""
    flags = _cpu_flags()
    return tuple(name for name, needs in _ISA_FLAGS.items() if set(needs) <= flags)


def isa() -> str:
    """The instruction set to build for: "avx512" when the CPU has AVX-512F besides AVX2, FMA and F16C,
    "avx2" when it has those three, else "generic".

    The environment variable FASTRL_NATIVE_ISA (one of ``ISAS``) overrides the detection; any other
    value is an error rather than a silent fallback.
    """
    forced = os.environ.get("FASTRL_NATIVE_ISA", "").strip().lower()
    if forced:
        if forced not in ISAS:
            raise ValueError(f"FASTRL_NATIVE_ISA: expected one of {', '.join(ISAS)}, got {forced!r}")
        return forced
    return supported_isas()[0]


def _source_bytes(src: Path) -> dict:
    return {name: (src / name).read_bytes() for name in _SOURCES + _HEADERS}


def _flags(target_isa: str) -> tuple:
    cflags = ["-O3", "-fopenmp"]
    if target_isa in ("avx2", "avx512"):
        cflags += ["-mavx2", "-mfma", "-mf16c"]
    if target_isa == "avx512":
        cflags += ["-mavx512f"]
    return cflags, ["-fopenmp"]


def _digest(files: dict, target_isa: str) -> str:
    # Everything this module feeds the build: the sources and the flags.
    parts = [files[name] for name in _SOURCES + _HEADERS] + [repr(_flags(target_isa)).encode()]
    return hashlib.sha256(b"".join(parts)).hexdigest()


def _sources_or_raise() -> Path:
    src = source_dir()
    if src is None:
        raise RuntimeError("fastrl_kernels.native: C++ sources not found (looked for csrc/ next to the package)")
    return src


def build_directory() -> Path:
    """Where the extension is built: torch's extensions root, one folder per Python, torch, ISA and sources.

    The ISA is part of the name because an AVX2 build must never be loaded on a CPU without AVX2
    (the root may be shared between machines); torch's version too, as the binary links against it;
    and a digest of the C++ sources and flags, so two installs of different versions never build into
    (or load a half-written library from) the same folder. The root is $TORCH_EXTENSIONS_DIR, else
    torch's default (~/.cache/torch_extensions).
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    torch_tag = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
    py_tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    target_isa = isa()
    digest = _digest(_source_bytes(_sources_or_raise()), target_isa)[:16]
    return Path(os.path.abspath(root)) / f"fastrl_native_{py_tag}_torch{torch_tag}_{target_isa}_{digest}"


def _copy_sources(files: dict, dest: Path) -> None:
    # Built from a copy inside the build folder, the ninja file is the same for every install with
    # these sources, wherever it lives: a second checkout loads the first one's build, not rebuilds it.
    dest.mkdir(mode=0o755, exist_ok=True)
    for name, data in files.items():
        target = dest / name
        if not target.is_file() or target.read_bytes() != data:
            target.write_bytes(data)


def _import_library(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(verbose: bool = False) -> ModuleType:
    from torch.utils.cpp_extension import load as load_extension

    files = _source_bytes(_sources_or_raise())
    target_isa = isa()
    digest = _digest(files, target_isa)
    cflags, ldflags = _flags(target_isa)
    # torch's rebuild check hashes the .cpp sources and the flags, not the headers: the digest among
    # the flags makes any edit rebuild.
    cflags = cflags + [f"-DFASTRL_NATIVE_SOURCES={digest[:16]}"]
    name = f"fastrl_native_{target_isa}"
    directory = build_directory()
    native_cache.make_directory(directory)
    native_cache.check(directory, "TORCH_EXTENSIONS_DIR")
    stamp = directory / "fastrl_sources.sha256"  # written once a build has loaded
    library = directory / f"{name}.so"

    def built() -> bool:
        return stamp.is_file() and stamp.read_text().strip() == digest

    def say_waiting() -> None:
        if not built():
            print(f"fastrl_kernels.native: waiting for another process compiling the C++ backend into {directory}",
                  file=sys.stderr, flush=True)

    with native_cache.exclusive(directory, on_wait=say_waiting):
        if built() and library.is_file():
            # The folder's name fixes every input of this build, so a finished one is loaded as it is.
            # (Asking torch would run ninja, which rebuilds from scratch whenever another ninja
            # version, say the system's and a virtualenv's, wrote the folder's build log last.)
            return _import_library(name, library)
        fresh = not built()
        if fresh:
            # A first build takes ~25 s on two cores: say so, rather than stall a training step in silence.
            print(f"fastrl_kernels.native: compiling the C++ backend for {target_isa} into {directory} "
                  "(first use after an install or an update; later runs load it)", file=sys.stderr, flush=True)
            stamp.unlink(missing_ok=True)
        src = directory / "src"
        _copy_sources(files, src)
        module = load_extension(
            name=name,
            sources=[str(src / source) for source in _SOURCES],
            extra_include_paths=[str(src)],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(directory),
            verbose=verbose,
        )
        if fresh:
            stamp.write_text(digest)
    return module


def load(verbose: bool = False) -> ModuleType:
    """The compiled extension module, building it on first call (cached per process and on disk).

    Raises RuntimeError carrying the compiler's message when it cannot be built; a failure is
    remembered, so later calls raise at once. Safe to call from several threads (a lock) and
    processes (a file lock on the build directory, ``native_cache.exclusive``).
    """
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        try:
            _module = _build(verbose=verbose)
        except Exception as error:  # a compiler error, missing ninja or compiler, a bad cache...
            _error = f"fastrl_kernels.native: the C++ extension could not be built: {error}"
            raise RuntimeError(_error) from error
        return _module


def is_available() -> bool:
    """True when the extension is (or can now be) built and loaded; never raises."""
    try:
        load()
    except RuntimeError:
        return False
    return True


def _softcap_arg(params: CoreParams) -> float:
    # The extension takes 0 for "no softcap"; a softcap must be > 0.
    if params.softcap is None:
        return 0.0
    if not params.softcap > 0:
        raise ValueError(f"softcap: expected a number > 0 or None, got {params.softcap!r}")
    return float(params.softcap)


# Buffers from this size up are advised to use transparent huge pages (see csrc/native.cpp).
_HUGE_PAGE_MIN_BYTES = 64 << 20


def _rows_f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def stats(logits: torch.Tensor, targets: torch.Tensor, params: CoreParams, with_log_sum_p2: bool = False) -> CoreStats:
    """Pass 1 over CPU logits ``[N, V]`` (float32 / bfloat16 / float16, stride(-1) == 1, any row stride).

    targets int64 ``[N]`` in [0, V) or ``params.ignore_index``. With x the transformed row (see
    ``CoreParams``), m = max x, s = sum e^{x-m}, t = sum e^{x-m}(x-m) (fp32 accumulation, shifted):
    logp = (x_y - m) - log s, entropy = log s - t/s, lse = m + log s, mean_x = m + t/s and, if asked,
    log_sum_p2 = log sum p^2. ``[N]``, float32 but lse and mean_x float64 (core.CoreStats).
    Rows with target == ignore_index give logp =
    entropy = 0 and are not read: their lse, mean_x, log_sum_p2 are 0 (pass 2 ignores them too).
    """
    module = load()
    out = module.stats(
        logits,
        targets.contiguous(),
        float(params.temperature),
        float(params.logit_scale),
        _softcap_arg(params),
        int(params.ignore_index),
        bool(with_log_sum_p2),
    )
    return CoreStats(*out[:4], out[4] if with_log_sum_p2 else None)


def grad(logits: torch.Tensor, targets: torch.Tensor, stats: CoreStats, g_lp: torch.Tensor,
         g_entropy: torch.Tensor, params: CoreParams, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pass 2: dL/dlogits for per-row coefficients g_lp = dL/dlogp, g_entropy = dL/dentropy.

    p = e^{x - lse}; dL/dx_j = g_lp (1[j=y] - p_j) - g_entropy p_j (x_j - mean_x); dL/dz = dL/dx dx/dz
    with dx/dz = logit_scale / temperature (times 1 - tanh^2 under softcap). Uses ``stats.lse`` and
    ``stats.mean_x`` (float64 ``[N]``, taken apart on a float frame so p stays exact at |x| = 1e4).
    ``out``: None -> a new contiguous tensor of the logits'
    shape and dtype; else a tensor of that shape and dtype with stride(-1) == 1, possibly ``logits``
    itself (in-place). Rows with target == ignore_index get a zero row. Returns ``out``.
    """
    module = load()
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if out.numel() * out.element_size() >= _HUGE_PAGE_MIN_BYTES:
            module.advise_huge_pages(out)
    return module.grad(
        logits,
        targets.contiguous(),
        stats.lse.to(torch.float64).contiguous(),
        stats.mean_x.to(torch.float64).contiguous(),
        _rows_f32(g_lp),
        _rows_f32(g_entropy),
        out,
        float(params.temperature),
        float(params.logit_scale),
        _softcap_arg(params),
        int(params.ignore_index),
    )


# float64 logits (for testing) run on a float32 copy of the rows; the gradient comes back in float64.
stats, grad = float64_on_float32_rows(stats, grad)


def _main(argv: list) -> int:
    if argv[:1] != ["build"]:
        print("usage: python -m fastrl_kernels.native build", file=sys.stderr)
        return 2
    try:
        module = load(verbose="-v" in argv or "--verbose" in argv)
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"fastrl_kernels.native: built ({module.isa}) in {build_directory()}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
