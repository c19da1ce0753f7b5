"""Outputs of the suite: the console table, JSON, a markdown table, and memory / time plots (PNG)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .cases import NAIVE


def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _shape_text(row: dict[str, Any]) -> str:
    return "x".join(str(v) for v in row["shape"].values())


def table_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["case", "shape", "dtype", "impl", "time ms", "peak extra MB", "GB/s", "% copy BW",
              "speedup vs naive", "memory vs naive"]
    body = []
    for row in rows:
        if row["status"] == "ok":
            cells = [
                _fmt(row.get("time_ms"), ".2f"), _fmt(row.get("peak_extra_mb"), ".1f"), _fmt(row.get("gbps"), ".2f"),
                _fmt(row.get("pct_copy_bandwidth"), ".0f", "%"), _fmt(row.get("speedup_vs_naive"), ".2f", "x"),
                _fmt(row.get("memory_vs_naive"), ".3f"),
            ]
        else:
            cells = [row["status"], "", "", "", "", ""]
        body.append([row["case"], _shape_text(row), row["dtype"], row["impl"]] + cells)
    return header, body


def format_table(rows: Sequence[dict[str, Any]], include_skipped: bool = False) -> str:
    """Fixed-width text table of the measured rows (skipped ones are listed in the log instead)."""
    shown = [r for r in rows if include_skipped or r["status"] != "skipped"]
    header, body = table_rows(shown)
    widths = [max(len(str(x)) for x in column) for column in zip(header, *body)] if body else map(len, header)
    widths = list(widths)
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in body]
    return "\n".join(lines)


def _meta_lines(meta: dict[str, Any]) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    return [
        f"- command: `{meta.get('command', '')}`",
        f"- date: {meta.get('date', '')}; device: {meta.get('device', '')} ({meta.get('device_name', '')}), "
        f"{meta.get('cpu_count')} CPUs, torch threads {meta.get('torch_threads')}, "
        f"load average at start {meta.get('load_average')}",
        f"- versions: {versions}",
        f"- time: {meta.get('timing', '')}",
        f"- peak extra memory: {meta.get('memory', '')}",
        f"- GB/s: {meta.get('gbps', '')}; copy bandwidth measured in the same run: "
        f"{_fmt(meta.get('copy_gbps'), '.1f')} GB/s",
    ]


def summary_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Compact table for a README: a row per (case, shape), a column per implementation, each cell
    ``speedup x / memory ratio`` vs naive (naive's own cell: its time and peak extra memory)."""
    measured = [r for r in rows if r["status"] == "ok"]
    impls = list(dict.fromkeys(r["impl"] for r in measured))
    keys = list(dict.fromkeys((r["case"], _shape_text(r), r["dtype"]) for r in measured))
    cells = {(r["case"], _shape_text(r), r["dtype"], r["impl"]): r for r in measured}
    lines = ["| case | shape | dtype | " + " | ".join(impls) + " |", "|" + "---|" * (3 + len(impls))]
    for key in keys:
        row_cells = []
        for impl in impls:
            row = cells.get(key + (impl,))
            if row is None:
                row_cells.append("")
            elif impl == NAIVE:
                row_cells.append(f"{row['time_ms']:.0f} ms, {_fmt(row.get('peak_extra_mb'), '.0f')} MB")
            else:
                row_cells.append(f"{_fmt(row.get('speedup_vs_naive'), '.2f', 'x')} / "
                                 f"{_fmt(row.get('memory_vs_naive'), '.3f')}")
        lines.append("| " + " | ".join(key) + " | " + " | ".join(row_cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any], title: str = "fastrl-bench results") -> str:
    """A markdown report: how it was measured, the summary of ratios, every measured row, skip lines."""
    header, body = table_rows([r for r in rows if r["status"] != "skipped"])
    lines = [f"# {title}", ""] + _meta_lines(meta) + [""]
    lines += ["Summary: speedup vs naive (naive time / time) / memory vs naive (peak extra / naive's); "
              "naive column: its time and peak extra memory.", "", summary_markdown(rows), "All measurements:", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    skipped = sorted({f"{r['impl']}: {r.get('reason', '')}" for r in rows if r["status"] == "skipped"})
    errors = sorted({f"{r['case']} {_shape_text(r)} {r['impl']}: {r.get('reason', '')}"
                     for r in rows if r["status"] == "error"})
    if skipped:
        lines += ["", "Skipped:"] + [f"- {line}" for line in skipped]
    if errors:
        lines += ["", "Errors:"] + [f"- {line}" for line in errors]
    lines += ["", "speedup vs naive = naive time / time; memory vs naive = peak extra / naive's peak extra."]
    return "\n".join(lines) + "\n"


def write_json(rows: Sequence[dict[str, Any]], meta: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": list(rows)}, indent=1, sort_keys=False) + "\n")
    return path


def write_markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(rows, meta))
    return path


# ---------------------------------------------------------------------------------------------
# plots


def _sweep(rows: list[dict[str, Any]], vary: str, fixed: str) -> tuple[Optional[int], list[dict[str, Any]]]:
    """The rows of the longest sweep over ``vary`` at one value of ``fixed`` (other letters constant)."""
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        rest = tuple(sorted((k, v) for k, v in row["shape"].items() if k != vary))
        groups[rest].append(row)
    if not groups:
        return None, []
    best = max(groups.values(), key=lambda g: (len({r["shape"][vary] for r in g}), len(g)))
    if len({r["shape"][vary] for r in best}) < 2:
        return None, []
    return best[0]["shape"].get(fixed), best


def _impl_style(impl: str) -> dict[str, Any]:
    if impl == NAIVE:
        return {"color": "black", "linewidth": 2.2}
    style: dict[str, Any] = {"marker": "o", "markersize": 3.5}
    if impl.endswith("+inplace"):
        style["linestyle"] = "--"
    return style


def _draw(ax, rows, vary: str, key: str, scale: float, reference: bool) -> None:
    by_impl: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok" and row.get(key) is not None:
            by_impl[row["impl"]].append((row["shape"][vary], row[key] / scale))
    for impl, points in by_impl.items():
        points.sort()
        # Below 0.01 MB the RSS method reads noise; the floor keeps such rows on a log axis.
        ax.plot([p[0] for p in points], [max(p[1], 1e-2) for p in points], label=impl, **_impl_style(impl))
    if reference:
        points = sorted({(r["shape"][vary], r["grad_bytes"] / scale) for r in rows if r.get("grad_bytes")})
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], color="grey", linestyle=":", linewidth=3,
                    alpha=0.6, label="size of the gradient")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)


def _draw_bars(axes, case_name: str, rows: list[dict[str, Any]]) -> None:
    """Grouped bars per shape (memory, time) when the shapes form no sweep."""
    ok = [r for r in rows if r["status"] == "ok"]
    shapes = list(dict.fromkeys(_shape_text(r) for r in ok))
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    width = 0.8 / max(len(impls), 1)
    for ax, key, scale, label in ((axes[0], "peak_extra_bytes", 1e6, "peak extra memory (MB)"),
                                  (axes[1], "time_ms", 1.0, "time (ms)")):
        for k, impl in enumerate(impls):
            values = []
            for shape in shapes:
                match = [r for r in ok if r["impl"] == impl and _shape_text(r) == shape and r.get(key) is not None]
                values.append(max(match[0][key] / scale, 1e-2) if match else 0.0)
            positions = [x + (k - (len(impls) - 1) / 2) * width for x in range(len(shapes))]
            color = "black" if impl == NAIVE else None
            ax.bar(positions, values, width, label=impl, color=color, hatch="//" if "+inplace" in impl else None)
        ax.set_xticks(range(len(shapes)), [f"N x V = {s}" for s in shapes])
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_title(f"{case_name}: {label.split(' (')[0]} by shape", fontsize=9)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    for ax in axes[2:]:
        ax.set_axis_off()
    if len(axes) > 2:
        axes[2].legend(*axes[0].get_legend_handles_labels(), loc="center left", fontsize=9)


def plot_op(rows: Sequence[dict[str, Any]], meta: dict[str, Any], path: str | Path) -> Optional[Path]:
    """One PNG per op: a row per case (variant) with memory vs N, time vs N and memory vs V panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    case_names = list(dict.fromkeys(r["case"] for r in rows))
    if not case_names:
        return None
    panels = [("N", "V", "peak_extra_bytes", 1e6, "peak extra memory (MB)", True),
              ("N", "V", "time_ms", 1.0, "time (ms)", False),
              ("V", "N", "peak_extra_bytes", 1e6, "peak extra memory (MB)", True)]
    fig, axes = plt.subplots(len(case_names), len(panels), figsize=(5.2 * len(panels), 4.2 * len(case_names)),
                             squeeze=False)
    for i, case_name in enumerate(case_names):
        case_rows = [r for r in rows if r["case"] == case_name]
        if not any(_sweep(case_rows, vary, fixed)[1] for vary, fixed, *_ in panels):
            _draw_bars(axes[i], case_name, case_rows)
            continue
        for j, (vary, fixed, key, scale, label, reference) in enumerate(panels):
            ax = axes[i][j]
            fixed_value, sweep = _sweep(case_rows, vary, fixed)
            if not sweep:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"no sweep over {vary}", ha="center", va="center", transform=ax.transAxes)
                continue
            _draw(ax, sweep, vary, key, scale, reference)
            ax.set_xlabel(vary)
            ax.set_ylabel(label)
            ax.set_title(f"{case_name}: {label.split(' (')[0]} vs {vary} ({fixed}={fixed_value})", fontsize=9)
            ax.legend(fontsize=7)
    first = rows[0]
    versions = meta.get("versions", {})
    fig.suptitle(
        f"{first['op']} | {first['dtype']} | {meta.get('device', first['device'])} ({meta.get('device_name', '')}) | "
        f"torch {versions.get('torch', '?')}, fastrl-kernels {versions.get('fastrl-kernels', '?')} | "
        f"{meta.get('date', '')}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(rows: Sequence[dict[str, Any]], meta: dict[str, Any], path: str | Path) -> list[Path]:
    """``path`` with ``_<op>`` before its suffix, one PNG per op (``cpu.png`` -> ``cpu_policy_loss.png``)."""
    path = Path(path)
    written = []
    for op in dict.fromkeys(r["op"] for r in rows):
        target = path.with_name(f"{path.stem}_{op}{path.suffix or '.png'}")
        done = plot_op([r for r in rows if r["op"] == op], meta, target)
        if done is not None:
            written.append(done)
    return written
