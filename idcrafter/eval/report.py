"""Writing an evaluation `Report`: per_sample.csv, summary.json, table.md and summary.png.

Every file is rendered in memory first and then written under a temporary name and renamed, so a
failed run leaves no output and a finished one never a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from idcrafter.eval.metrics import COLUMNS, TOTAL, Report, normalise, title
from idcrafter.utils.io import atomic_write

__all__ = ["OUTPUT_FILES", "markdown_table", "per_sample_csv", "render_outputs", "summary", "summary_png", "write_report"]

OUTPUT_FILES = ("per_sample.csv", "summary.json", "table.md", "summary.png")


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def per_sample_csv(report: Report) -> str:
    """One row per sample: id, kind (video / image), then every column by its title; blank = n/a."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "kind", *(title(k) for k in report.columns)])
    for i, sample_id in enumerate(report.ids):
        kind = report.kinds[i] if i < len(report.kinds) else ""
        writer.writerow([sample_id, kind, *(_fmt(report.values[k][i]) for k in report.columns)])
    return buffer.getvalue()


def summary(report: Report, inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON summary: aggregates, per-column counts, skipped columns with reasons, weights, warnings."""
    return {
        "inputs": dict(inputs or {}),
        "samples": len(report.ids),
        "videos": report.kinds.count("video"),
        "images": report.kinds.count("image"),
        "aggregate": {title(k): report.mean(k) for k in report.columns},
        "columns": {title(k): {"key": k, "mean": report.mean(k), "count": len(report.ids) if k == TOTAL else report.count(k),
                               "weight": report.used_weights.get(k, 0.0)} for k in report.columns},
        "skipped": {title(k): reason for k, reason in report.skipped.items()},
        "weights": report.weights,
        "weights_used": report.used_weights,
        "normalisation": {k: [c.low, c.high, "higher is better" if c.higher_is_better else "lower is better"]
                          for k, c in COLUMNS.items()},
        "warnings": report.warnings,
        **report.extra,
    }


def markdown_table(report: Report) -> str:
    """The aggregate row, the per-sample rows, then what was skipped, the weights and warnings."""
    heads = [title(k) for k in report.columns]
    lines = ["# Evaluation", ""]
    if "protocol" in report.extra:
        lines += [f"Protocol: {report.extra['protocol']}", ""]
    if report.columns:
        lines += ["| sample | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
        lines.append(f"| **mean** ({len(report.ids)}) | " + " | ".join(f"**{_fmt(report.mean(k))}**" for k in report.columns) + " |")
        for i, sample_id in enumerate(report.ids):
            lines.append(f"| {sample_id} | " + " | ".join(_fmt(report.values[k][i]) for k in report.columns) + " |")
    else:
        lines.append("No column was computed.")
    if report.skipped:
        lines += ["", "Skipped:"] + [f"- {title(k)}: {reason}" for k, reason in report.skipped.items()]
    lines += _opens2v_lines(report.extra.get("opens2v"))
    used = report.used_weights
    if used:
        total = sum(used.values())
        weights = ", ".join(f"{title(k)} {w:g}" for k, w in used.items())
        lines += ["", f"Total = weighted mean of the columns mapped to [0, 1]: {weights} (divided by {total:g})."]
    if report.warnings:
        counts = "; ".join(f"{title(k)}: " + ", ".join(f"{reason} x{n}" for reason, n in c.items())
                           for k, c in report.warnings.items())
        lines += ["", f"Reward warnings: {counts}."]
    return "\n".join(lines) + "\n"


def _opens2v_lines(info: Mapping[str, Any] | None) -> list[str]:
    """The OpenS2V leaderboard's normalised columns (in %) and each domain's TotalScore or what it lacks."""
    if not info:
        return []
    cols = ", ".join(f"{k} {v * 100:.2f}%" for k, v in info["normalised"].items() if v is not None)
    lines = ["", f"OpenS2V-Eval {info['version']} leaderboard columns: {cols or 'none computed'}."]
    for domain, row in info["totals"].items():
        value = f"{row['total'] * 100:.2f}%" if row["total"] is not None else f"n/a (missing {', '.join(row['missing'])})"
        lines.append(f"- TotalScore {domain}: {value}")
    return lines


def summary_png(report: Report) -> bytes:
    """Bar chart of the aggregate columns (mapped to [0, 1], raw mean written on each bar), then one
    strip of example frames per kept sample with its scores. Rendered with the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    main = [k for k in report.main_columns if report.mean(k) is not None]
    rows = len(report.examples)
    fig = Figure(figsize=(max(6.0, 1.1 * len(main) + 2), 3.2 + 1.6 * rows), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1 + rows, 1, height_ratios=[2.2] + [1.0] * rows, hspace=1.0)
    ax = fig.add_subplot(grid[0])
    if main:
        heights = [normalise(k, report.mean(k)) if k != TOTAL else report.mean(k) for k in main]
        bars = ax.bar(range(len(main)), heights, color=["#4c72b0" if k != TOTAL else "#dd8452" for k in main])
        for bar, key in zip(bars, main):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.02, f"{report.mean(key):.3f}",
                    ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(main)), [title(k) for k in main], fontsize=8, rotation=20)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("mapped to [0, 1]")
    skipped = f"; skipped: {', '.join(title(k) for k in report.skipped)}" if report.skipped else ""
    ax.set_title(textwrap.fill(f"{len(report.ids)} samples{skipped}", width=int(fig.get_figwidth() * 12)), fontsize=9)
    index = {sample_id: i for i, sample_id in enumerate(report.ids)}
    for r, (sample_id, frames) in enumerate(report.examples):
        sub = fig.add_subplot(grid[1 + r])
        strip = np.concatenate(list(frames), axis=1)
        sub.imshow(strip, interpolation="nearest")
        sub.set_axis_off()
        i = index.get(sample_id)
        scores = "" if i is None else "  ".join(
            f"{title(k)} {report.values[k][i]:.3f}" for k in main if report.values[k][i] is not None)
        # Scores start at the figure's left edge (not the strip's), wrapped to the figure width.
        text = textwrap.fill(f"{sample_id}   {scores}", width=int(fig.get_figwidth() * 15))
        fig.text(0.03, sub.get_position().y1 + 0.005, text, fontsize=8, va="bottom", ha="left")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def render_outputs(report: Report, inputs: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """file name -> contents of every output, rendered in memory."""
    return {
        "per_sample.csv": per_sample_csv(report).encode(),
        "summary.json": (json.dumps(summary(report, inputs), indent=2) + "\n").encode(),
        "table.md": markdown_table(report).encode(),
        "summary.png": summary_png(report),
    }


def write_report(report: Report, out: str | Path, inputs: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write the four outputs into folder `out` (created if needed) -> name -> path."""
    contents = render_outputs(report, inputs)
    out = Path(out)
    paths = {}
    for name, data in contents.items():
        with atomic_write(out / name) as tmp:
            tmp.write_bytes(data)
        paths[name] = out / name
    return paths
