"""Compile the Triton kernels ahead of time for a GPU that is not here and read what the GPU would run.

    python -m fastrl_kernels.triton.inspect --arch sm_90a [--arch sm_80] [--all] [--json PATH]

Every kernel variant of the launch table (``online_softmax.launch_config``) is compiled for the named
architectures on this machine (no GPU, no driver: Triton's compiler and the ``ptxas`` / ``nvdisasm``
shipped in its wheel). For each variant the report gives registers per thread, spilled bytes, shared
memory, and the SASS instructions per logit element of the hot loop: the instructions of the loop
that streams the vocabulary (the backward branch whose body holds the most global loads), divided by
the elements one thread handles per iteration (rows x block_v / threads). That last number is what
decides whether a streaming kernel is bound by memory or by instruction issue (docs/gpu.md).

The kernels are compiled with the argument specialisation Triton's launcher applies at run time:
pointers 16-byte aligned, integer arguments divisible by 16 marked so (the vocabulary, the row
stride) and integers equal to 1 folded, so the code is the code a launch would run. Without ``--all``
the variants are the production ones at the vocabularies of common models; ``--all`` adds every tile
of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .grad import grad_kernel_variant
from .online_softmax import LaunchConfig, launch_config
from .stats import stats_kernel_variant

ARCHS = {"sm_90a": 90, "sm_80": 80}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Vocabularies of common models: GPT-2 (50257, not a multiple of 16), Llama-2 (32000), Llama-3
# (128256), Qwen2 (151936); small ones exercise the many-rows-per-program tiles.
MODEL_VOCABS = (32000, 50257, 128256, 151936)


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: which kernel, logits dtype, vocabulary, tile and compile-time flags."""

    kernel: str  # "stats" or "grad"
    dtype: str  # "fp32", "bf16", "fp16"
    vocab: int
    launch: LaunchConfig
    has_softcap: bool = False
    with_log_sum_p2: bool = False  # stats only


@dataclass
class Report:
    """What the GPU would run for one variant on one architecture."""

    variant: dict
    arch: str
    registers: int
    spill_bytes: int  # stack frame + local memory of the cubin Triton built: registers spilled
    shared_bytes: int
    loop_instructions: int
    elements_per_thread: float
    instructions_per_element: float
    loop_opcodes: dict


def variants(all_tiles: bool = False, vocabs: tuple = MODEL_VOCABS, dtypes: tuple = tuple(DTYPES)) -> list[Variant]:
    """The variants of the launch table: production tiles at ``vocabs`` (every tile with ``all_tiles``)."""
    sizes = list(vocabs)
    if all_tiles:
        # One vocabulary per tile of the table: every power of two up to the largest tile, plus one
        # above each (a partial last block), plus one that is not a multiple of 16.
        sizes += [2**i for i in range(0, 14)] + [2**i + 1 for i in range(4, 14)] + [1000]
    out = []
    for dtype in dtypes:
        for vocab in sorted(set(sizes)):
            for softcap in (False, True):
                for p2 in (False, True):
                    launch = launch_config(vocab, DTYPES[dtype], "stats", softcap, p2)
                    out.append(Variant("stats", dtype, vocab, launch, softcap, p2))
                out.append(Variant("grad", dtype, vocab, launch_config(vocab, DTYPES[dtype], "grad", softcap), softcap))
    return out


def _int_attr(value: int) -> str:
    """The launcher's specialisation of an integer argument: "1" (folded), "D" (divisible by 16) or ""."""
    if value == 1:
        return "1"
    return "D" if value % 16 == 0 else ""


def _source(variant: Variant) -> ASTSource:
    """The kernel of ``variant`` with the signature, constants and attributes its launcher produces."""
    dtype = DTYPES[variant.dtype]
    rows = 8192  # any multiple of 16: the row count and row stride specialise like a real batch's
    if variant.kernel == "stats":
        fn, arg_kinds, constexprs = stats_kernel_variant(
            variant.has_softcap, variant.with_log_sum_p2, variant.launch, variant.vocab
        )
    else:
        fn, arg_kinds, constexprs = grad_kernel_variant(variant.has_softcap, variant.launch, variant.vocab)
    ints = {"n_rows": rows, "vocab": variant.vocab, "stride_row": variant.vocab, "stride_out_row": variant.vocab}
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind = arg_kinds[name]
        if kind == "logits*":
            signature[name] = "*" + _TRITON_TYPES[dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif kind.endswith("*"):
            signature[name] = "*" + kind[:-1]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif kind in ("i32", "i64"):
            spec = _int_attr(ints[name]) if name in ints else ""
            if spec == "1":
                signature[name] = "constexpr"
                constexprs = {**constexprs, name: 1}
                continue
            signature[name] = kind
            if spec == "D":
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = kind
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _bin(tool: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    if not path.exists():
        raise FileNotFoundError(f"{tool}: expected in the triton wheel at {path}")
    return str(path)


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*(.*?);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def hot_loop(sass: str) -> list[str]:
    """Opcodes of the loop with the most global loads: the body between a label and the backward
    branch to it (nested branches and all), as listed by nvdisasm."""
    opcodes: list[str] = []
    labels: dict[str, int] = {}
    loops: list[tuple[int, int]] = []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(opcodes)
            continue
        instruction = _SASS_LINE.search(line)
        if not instruction:
            continue
        opcodes.append(instruction.group(1) + (instruction.group(2) or ""))
        if instruction.group(1) == "BRA":
            target = _BRANCH_TARGET.search(line)
            if target and target.group(1) in labels:  # a label already seen: a backward branch
                loops.append((labels[target.group(1)], len(opcodes)))
    if not loops:
        return []
    start, stop = max(loops, key=lambda span: sum(op.startswith("LDG") for op in opcodes[span[0]:span[1]]))
    return opcodes[start:stop]


def inspect_variant(variant: Variant, arch: str, workdir: Path) -> Report:
    """Compile ``variant`` for ``arch`` and read registers, spills, shared memory and the hot loop."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Under the interpreter @triton.jit gives Python functions, which cannot be compiled for a GPU.
        raise RuntimeError("fastrl_kernels.triton.inspect: unset TRITON_INTERPRET (kernels are being interpreted)")
    target = GPUTarget("cuda", ARCHS[arch], 32)
    compiled = triton.compile(_source(variant), target=target, options={"num_warps": variant.launch.num_warps})
    stem = workdir / f"{variant.kernel}-{variant.dtype}-{variant.vocab}-{int(variant.has_softcap)}" \
        f"{int(variant.with_log_sum_p2)}-{arch}"
    cubin = stem.with_suffix(".cubin")
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                           text=True, check=True).stdout
    reg, stack, shared, local = (int(v) for v in _RESOURCES.search(usage).groups())
    # The dynamic shared memory Triton asks for at launch is in the metadata, not the cubin.
    shared = max(shared, int(getattr(compiled.metadata, "shared", 0)))
    sass = subprocess.run([_bin("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    loop = hot_loop(sass)
    per_thread = variant.launch.rows * variant.launch.block_v / (32 * variant.launch.num_warps)
    counts: dict[str, int] = {}
    for op in loop:
        base = op.split(".")[0]
        counts[base] = counts.get(base, 0) + 1
    return Report(
        variant={**asdict(variant), "launch": asdict(variant.launch)},
        arch=arch,
        registers=reg,
        spill_bytes=stack + local,
        shared_bytes=shared,
        loop_instructions=len(loop),
        elements_per_thread=per_thread,
        instructions_per_element=round(len(loop) / per_thread, 2) if loop else 0.0,
        loop_opcodes=dict(sorted(counts.items(), key=lambda kv: -kv[1])),
    )


def format_table(reports: list[Report]) -> str:
    """A markdown table, one row per report."""
    lines = [
        "| kernel | dtype | V | rows x block_v, warps | softcap | log_sum_p2 | arch | regs | spills (B) | smem (B) "
        "| loop instr | elem/thread | SASS/elem |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        v, launch = r.variant, r.variant["launch"]
        lines.append(
            f"| {v['kernel']} | {v['dtype']} | {v['vocab']} | {launch['rows']} x {launch['block_v']}, "
            f"{launch['num_warps']} | {'y' if v['has_softcap'] else '-'} | "
            f"{'y' if v['with_log_sum_p2'] else '-'} | {r.arch} | {r.registers} | "
            f"{r.spill_bytes} | {r.shared_bytes} | {r.loop_instructions} | "
            f"{r.elements_per_thread:g} | {r.instructions_per_element:g} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastrl_kernels.triton.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), help="repeatable; default sm_90a")
    parser.add_argument("--all", action="store_true", help="every tile of the launch table, not only model vocabs")
    parser.add_argument("--vocab", type=int, action="append", help="only these vocabularies (repeatable)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="only these dtypes (repeatable)")
    parser.add_argument("--kernel", choices=("stats", "grad"), help="only this kernel")
    parser.add_argument("--json", type=Path, help="write the reports here as JSON")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many processes")
    args = parser.parse_args(argv)
    archs = args.arch or ["sm_90a"]
    chosen = variants(args.all, tuple(args.vocab) if args.vocab else MODEL_VOCABS,
                      tuple(args.dtype) if args.dtype else tuple(DTYPES))
    if args.kernel:
        chosen = [v for v in chosen if v.kernel == args.kernel]
    jobs = [(variant, arch) for arch in archs for variant in chosen]
    reports = []
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        # Compiling is single-threaded Python and LLVM: one process per core.
        futures = [pool.submit(inspect_variant, variant, arch, Path(tmp)) for variant, arch in jobs]
        for future in futures:
            reports.append(future.result())
            print(format_table(reports[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(reports))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}
        args.json.write_text(json.dumps({"versions": meta, "reports": [asdict(r) for r in reports]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
