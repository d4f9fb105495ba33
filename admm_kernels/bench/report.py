"""Benchmark outputs: the summary, text and markdown tables, CSV and JSON files, PNG plots.

Files (each written atomically into the output folder):
    layers.csv       one row per layer x method x pattern x sparsity (ROW_COLUMNS)
    summary.csv      one row per method x pattern x sparsity, averaged over layers (SUMMARY_COLUMNS)
    perplexity.csv   end-to-end rows, when --perplexity was given
    results.json     {"schema", "meta" (versions, seed, machine, commit, settings), "machine" (measured
                     peaks), "grams", "rows", "summary", "perplexity"}
    errors.png       mean relative error vs sparsity per method, one panel per pattern
    times.png        mean seconds per layer per method, one bar group per pattern
    pareto.png       mean error vs mean seconds per layer, one panel per pattern and sparsity, with the
                     Pareto front (the methods no other method beats on both) drawn and labelled: which
                     method to pick for a time budget
The summary's "pareto" column marks the rows on their panel's front. "error_vs_admm" / "time_vs_admm":
the median over layers of the row's error / seconds divided by ADMM-Grad's on the same layer in the same
run (when the run has an "admm" or "admm-grad" spec): the ratios the presets' targets are stated in.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

SCHEMA = "admm_kernels.bench/1"
ROW_COLUMNS = ("layer", "block", "shape", "method", "pattern", "target_sparsity", "achieved_sparsity",
               "error", "heldout_error", "optimum_error", "gap", "seconds", "gflops", "frac_matmul",
               "mask_gbps", "frac_copy", "iterations", "mask_sha256", "backends")
SUMMARY_COLUMNS = ("method", "pattern", "sparsity", "layers", "mean_error", "mean_heldout_error",
                   "mean_optimum_error",
                   "mean_gap", "mean_seconds", "total_seconds", "achieved_sparsity", "frac_matmul",
                   "frac_copy", "error_vs_admm", "heldout_vs_admm", "time_vs_admm", "pareto")
# The reference of the per-layer ratio columns: the seed's ADMM-Grad under either of its spec names.
RATIO_BASELINES = ("admm", "admm-grad")
PPL_COLUMNS = ("method", "pattern", "sparsity", "perplexity", "seconds", "achieved_sparsity")
PROJECTION_COLUMNS = ("projection", "method", "pattern", "sparsity", "layers", "mean_error", "mean_seconds",
                      "achieved_sparsity")


from .._io import atomic_write_bytes as write_file  # noqa: E402
from .._io import writing  # noqa: E402


def _write(path: Path, data: bytes) -> None:
    with writing("the bench output", path):  # a full or read-only disk: one line naming the file
        write_file(path, data)


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (seconds, error) that no other point dominates (another is at most as slow
    and at most as wrong, and better in one of the two), in ascending seconds. Points with a None or NaN
    coordinate are never on the front; equal points are all on it."""
    valid = [i for i, (t, e) in enumerate(points)
             if t is not None and e is not None and not (math.isnan(t) or math.isnan(e))]
    front = []
    for i in valid:
        ti, ei = points[i]
        dominated = any(points[j][0] <= ti and points[j][1] <= ei and (points[j][0] < ti or points[j][1] < ei)
                        for j in valid if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1], i))


def _panel_key(row: dict) -> tuple[str, float]:
    return row["pattern"], round(row["sparsity"], 6)


def front_error(row: dict) -> float | None:
    """The error the Pareto front is drawn on: out of sample (held-out Gram) where measured, else the
    in-sample error (a method tuned on the calibration Gram must not win on it alone)."""
    held = row.get("mean_heldout_error")
    return held if held is not None else row["mean_error"]


def mark_pareto(summary: list[dict]) -> list[dict]:
    """Set summary[i]["pareto"] = True when the row is on the error-vs-time front of its (pattern,
    sparsity) panel (mean seconds, front_error); returns the summary."""
    panels: dict[tuple, list[int]] = {}
    for i, r in enumerate(summary):
        panels.setdefault(_panel_key(r), []).append(i)
    for idx in panels.values():
        on = set(pareto_front([(summary[i]["mean_seconds"], front_error(summary[i])) for i in idx]))
        for k, i in enumerate(idx):
            summary[i]["pareto"] = k in on
    return summary


def summarize(rows: list[dict]) -> list[dict]:
    """Per (method, pattern, sparsity) in first-seen order: means over layers (error, gap, seconds,
    achieved sparsity, roofline fractions) and the total seconds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["pattern"], round(r["target_sparsity"], 6)), []).append(r)
    out = []
    for (method, pattern, sparsity), rs in groups.items():
        out.append({
            "method": method, "pattern": pattern, "sparsity": sparsity, "layers": len(rs),
            "mean_error": _mean(r["error"] for r in rs),
            "mean_heldout_error": _mean(r.get("heldout_error") for r in rs),
            "mean_optimum_error": _mean(r.get("optimum_error") for r in rs),
            "mean_gap": _mean(r.get("gap") for r in rs),
            "mean_seconds": _mean(r["seconds"] for r in rs),
            "total_seconds": sum(r["seconds"] for r in rs),
            "achieved_sparsity": _mean(r["achieved_sparsity"] for r in rs),
            "frac_matmul": _mean(r.get("frac_matmul") for r in rs),
            "frac_copy": _mean(r.get("frac_copy") for r in rs),
            **_ratios_to_baseline(rs, groups, pattern, sparsity),
        })
    return mark_pareto(out)


def projection_of(layer: str) -> str:
    """A layer's name with its block and expert indices as '*': "model.layers.*.mlp.experts.*.down_proj"
    (every expert's down projection in every block is one projection)."""
    import re
    return re.sub(r"\.\d+(?=\.)", ".*", layer)


def summarize_by_projection(rows: list[dict]) -> list[dict]:
    """Per (projection, method, pattern, sparsity), first-seen order: mean error and seconds over its
    layers (so a MoE's experts are one row per projection, not one per expert)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (projection_of(r["layer"]), r["method"], r["pattern"], round(r["target_sparsity"], 6))
        groups.setdefault(key, []).append(r)
    return [{"projection": proj, "method": method, "pattern": pattern, "sparsity": sparsity,
             "layers": len(rs), "mean_error": _mean(r["error"] for r in rs),
             "mean_seconds": _mean(r["seconds"] for r in rs),
             "achieved_sparsity": _mean(r["achieved_sparsity"] for r in rs)}
            for (proj, method, pattern, sparsity), rs in groups.items()]


def _median(values: list[float]) -> float | None:
    vals = sorted(values)
    n = len(vals)
    if not n:
        return None
    return vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])


def _ratios_to_baseline(rs: list[dict], groups: dict, pattern: str, sparsity: float) -> dict:
    """Median per-layer error and time ratios of rows `rs` to ADMM-Grad's rows of the same panel."""
    base = next((groups[(b, pattern, sparsity)] for b in RATIO_BASELINES if (b, pattern, sparsity) in groups),
                None)
    if base is None:
        return {"error_vs_admm": None, "heldout_vs_admm": None, "time_vs_admm": None}
    by_layer = {r["layer"]: r for r in base}
    pairs = [(r, by_layer[r["layer"]]) for r in rs if r["layer"] in by_layer]

    def ratio(key: str) -> float | None:
        return _median([r[key] / b[key] for r, b in pairs if r.get(key) is not None and b.get(key)])
    return {"error_vs_admm": ratio("error"), "heldout_vs_admm": ratio("heldout_error"),
            "time_vs_admm": ratio("seconds")}


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return f"{v:g}"
        return f"{v:.4g}" if abs(v) >= 1e-3 else f"{v:.3e}"
    return str(v)


def text_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    """Aligned plain-text table (first column left-aligned, the rest right-aligned)."""
    cells = [list(columns)] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    _write(path, buf.getvalue().encode())


def write_json(path: Path, obj: dict) -> None:
    _write(path, (json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n").encode())


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display on servers; the PNGs are the output
    import matplotlib.pyplot as plt
    return plt


def _save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)  # ~30-50 KB per figure: small enough to commit
    _write(path, buf.getvalue())


def plot_errors(summary: list[dict], path: Path) -> bool:
    """Mean relative error vs sparsity, a line per method, a panel per pattern (N:M patterns share one
    panel, each at its own sparsity). False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None or not summary:
        return False
    panels: dict[str, list[dict]] = {}
    for s in summary:
        panels.setdefault("N:M" if ":" in s["pattern"] else s["pattern"], []).append(s)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
    for ax, (panel, rows) in zip(axes[0], panels.items()):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["sparsity"], r["mean_error"], r["pattern"])
                         for r in rows if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            if panel == "N:M":
                for x, y, pat in pts:
                    ax.annotate(pat, (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("mean relative error")
        ax.set_title(panel, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return True


def plot_times(summary: list[dict], path: Path) -> bool:
    """Mean seconds per layer of each method (bars), grouped by pattern and sparsity (log scale)."""
    plt = _pyplot()
    if plt is None or not summary:
        return False
    keys = list(dict.fromkeys((s["pattern"], s["sparsity"]) for s in summary))
    methods = list(dict.fromkeys(s["method"] for s in summary))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(keys) * max(1, len(methods) / 3)), 3.3))
    for i, m in enumerate(methods):
        vals = [next((s["mean_seconds"] for s in summary if s["method"] == m
                      and (s["pattern"], s["sparsity"]) == k), 0.0) for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], [max(v, 1e-6) for v in vals], width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels([p if ":" in p else f"{p} {s:g}" for p, s in keys], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return True


def plot_pareto(panels: dict[str, list[tuple[str, float, float]]], path: Path,
                xlabel: str = "mean seconds per layer", ylabel: str = "mean relative error") -> bool:
    """One panel per key of `panels` ({title: [(label, seconds, error), ...]}): every point, labelled, and
    the Pareto front (pareto_front) as a staircase, both axes logarithmic. False when matplotlib is
    missing or there is nothing to draw."""
    plt = _pyplot()
    if plt is None or not panels:
        return False
    from matplotlib import ticker

    n = len(panels)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.4 * nrows), squeeze=False)
    for ax, (title, pts) in zip(axes.flat, panels.items()):
        good = [(lab, max(t, 1e-6), max(e, 1e-12)) for lab, t, e in pts if t is not None and e is not None]
        front = pareto_front([(t, e) for _, t, e in good])
        for i, (lab, t, e) in enumerate(good):
            on = i in front
            ax.scatter([t], [e], s=28 if on else 16, color="C3" if on else "C0", zorder=3)
            ax.annotate(lab, (t, e), fontsize=6, textcoords="offset points", xytext=(3, 3),
                        fontweight="bold" if on else "normal")
        if front:
            xs, ys = [], []
            for i in front:  # staircase: a method is the best choice from its time until the next one's
                t, e = good[i][1], good[i][2]
                if xs:
                    xs.append(t)
                    ys.append(ys[-1])
                xs.append(t)
                ys.append(e)
            ax.plot(xs, ys, color="C3", linewidth=1, label="Pareto front")
            ax.legend(fontsize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.margins(x=0.2, y=0.1)  # room for the labels of the extreme points
        for axis in (ax.xaxis, ax.yaxis):  # ticks at 1, 2, 5 x 10^k, plainly labelled (no overlap)
            axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.tick_params(labelsize=7)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return True


def pareto_panels(summary: list[dict]) -> dict[str, list[tuple[str, float, float]]]:
    """The bench summary as plot_pareto's panels: one per (pattern, sparsity)."""
    panels: dict[str, list] = {}
    for r in summary:
        pattern, sparsity = _panel_key(r)
        title = pattern if ":" in pattern else f"{pattern} {sparsity:g}"
        panels.setdefault(title, []).append((r["method"], r["mean_seconds"], front_error(r)))
    return panels


def write_outputs(out: Path, result: dict) -> list[Path]:
    """Write every output file for `result` (the results.json object) into `out`; return the paths."""
    with writing("the bench output folder", out):
        out.mkdir(parents=True, exist_ok=True)
    written = [out / "layers.csv", out / "summary.csv", out / "projections.csv"]
    write_csv(written[0], result["rows"], ROW_COLUMNS)
    write_csv(written[1], result["summary"], SUMMARY_COLUMNS)
    write_csv(written[2], result["by_projection"], PROJECTION_COLUMNS)
    if result.get("perplexity"):
        written.append(out / "perplexity.csv")
        write_csv(written[-1], result["perplexity"], PPL_COLUMNS)
    if plot_errors(result["summary"], out / "errors.png"):
        written.append(out / "errors.png")
    if plot_times(result["summary"], out / "times.png"):
        written.append(out / "times.png")
    if plot_pareto(pareto_panels(result["summary"]), out / "pareto.png"):
        written.append(out / "pareto.png")
    written.append(out / "results.json")
    write_json(written[-1], result)  # last: its presence means the folder is complete
    return written
