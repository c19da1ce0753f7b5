"""``fastrl-bench``: time and peak extra memory of every op vs naive PyTorch and peers (docs/design.md, "Benchmarks").

    fastrl-bench --quick                                  # small CPU suite, a few minutes on 2 cores
    fastrl-bench --ops policy_loss --shapes 4096x32000,2048x151936 \\
        --json bench/results/cpu_policy_loss.json --markdown bench/results/cpu_policy_loss.md \\
        --plot bench/results/cpu_policy_loss.png
    fastrl-bench --device cuda --dtype bf16               # GPU suite (Triton backend, Liger when installed)

Prints a line per measurement, then a table with ratios vs naive eager PyTorch. Benchmarks record
numbers; they never assert on them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional

from .cases import families


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastrl-bench", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--quick", action="store_true", help="small shapes and fewer repeats")
    parser.add_argument("--ops", default=None,
                        help="comma-separated op families (default: all; see --list)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated NxV (logits ops) or NxVxH (lm_head ops), e.g. 4096x32000,2048x151936")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:K (default cpu)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (fp32, bf16, fp16)")
    parser.add_argument("--impls", default=None, help="comma-separated implementation names to keep (naive always)")
    parser.add_argument("--compile", dest="compile_mode", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile'd naive: auto = on CUDA only (CPU compiles take minutes)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per implementation")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 1)")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop repeating after this long")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per op family on CPU")
    parser.add_argument("--json", default=None, metavar="PATH", help="write results + metadata as JSON")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="write a markdown table")
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="PNG per op: PATH with _<op> before the suffix (cpu.png -> cpu_policy_loss.png)")
    parser.add_argument("--list", action="store_true", help="list op families and exit")
    parser.add_argument("--from-json", default=None, metavar="PATH",
                        help="measure nothing: re-write --markdown / --plot from a JSON written by --json")
    return parser


def _split(text: Optional[str]) -> Optional[list[str]]:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for name, family in families().items():
            print(f"{name}  (shapes {'x'.join(family.shape_keys)})")
        return 0
    from . import report
    from .runner import environment, run_suite

    if args.from_json:
        import json

        saved = json.loads(open(args.from_json).read())
        _write_outputs(saved["results"], saved["meta"], None, args.markdown, args.plot)
        return 0

    command = "fastrl-bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    meta = environment(args.device, command)
    rows = run_suite(
        args.device, _split(args.ops), _split(args.shapes), args.dtype, args.quick, impls=_split(args.impls),
        compile_mode=args.compile_mode, warmup=args.warmup, repeats=args.repeats, max_seconds=args.max_seconds,
        isolate=False if args.in_process else None,
    )
    meta["copy_gbps"] = rows[0]["copy_gbps"] if rows else None
    print()
    print(f"{meta['device']} ({meta['device_name']}), {meta['date']}, "
          f"torch {meta['versions'].get('torch')}, fastrl-kernels {meta['versions'].get('fastrl-kernels')}")
    print(report.format_table(rows))
    _write_outputs(rows, meta, args.json, args.markdown, args.plot)
    failed = [r for r in rows if r["status"] == "error"]
    return 1 if failed and not any(r["status"] == "ok" for r in rows) else 0


def _write_outputs(rows, meta, json_path, markdown_path, plot_path) -> None:
    from . import report

    if json_path:
        print(f"wrote {report.write_json(rows, meta, json_path)}")
    if markdown_path:
        print(f"wrote {report.write_markdown(rows, meta, markdown_path)}")
    if plot_path:
        for path in report.write_plots(rows, meta, plot_path):
            print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
