"""Method comparison on realistic random layers: time and relative error of each method and pattern.

    python benchmarks/compare.py --shapes 4096x4096,4096x11008 --out benchmarks/results/compare
    python benchmarks/compare.py --shapes 512x1024 --nsamples 4096 --out /tmp/cmp      # a quick check

For every shape (OUTxIN, as nn.Linear's weight) it builds calibration inputs like LLM activations
(correlated features plus a few large outlier features; --gram loads a saved (in, in) Gram instead), then
runs every method x pattern through admm_kernels.prune_layer and prints a markdown table. In the same run
it measures the machine's fp32 matmul throughput on the ADMM loop's own GEMM shape ((in, in) x (in, out))
and a Cholesky of (in, in), and reports
  - the ADMM loop's throughput (its 2*in^2*out FLOPs per iteration over the loop's time, mask updates
    included) as a fraction of that matmul throughput (the target: >= 75 %), and
  - a whole ADMM prune_layer's time over "iters GEMMs + one Cholesky" (target: <= 1.5).
With --reference, ADMM also runs with ADMM_KERNELS_BACKEND=reference (the plain-torch ops) for the ratio.
Methods are specs as `admm-prune bench --methods` takes them (every registered method, e.g. alps, and
presets / options such as admm:preset=NAME). Writes results.csv, results.md and (with matplotlib)
errors.png and pareto.png (error vs method time per shape and pattern, with the Pareto front: which
method to pick for a time budget) to --out, each atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import sys
import time
from pathlib import Path

import torch

try:
    import admm_kernels as ak
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import admm_kernels as ak
from admm_kernels._io import atomic_write_bytes  # noqa: E402
from admm_kernels.bench.machine import best_time  # noqa: E402
from admm_kernels.bench.methods import parse_methods  # noqa: E402
from admm_kernels.bench.report import plot_pareto  # noqa: E402


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        try:
            out, inn = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {part!r} is not OUTxIN (e.g. 4096x11008)") from None
        if out <= 0 or inn <= 0:
            raise SystemExit(f"--shapes: {part!r} must have positive sizes")
        shapes.append((out, inn))
    return shapes


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def calibration_gram(inn: int, nsamples: int, seed: int, chunk: int = 2048) -> torch.Tensor:
    """Gram (in, in) fp32 of `nsamples` token rows like LLM activations: a shared low-rank component
    (rank in/8) plus noise, and 0.5 % of the features (at least 4) scaled by 20 as outliers."""
    g = torch.Generator().manual_seed(seed)
    rank = max(1, inn // 8)
    mix = torch.randn(rank, inn, generator=g) / rank ** 0.5
    scale = torch.ones(inn)
    scale[torch.randperm(inn, generator=g)[:max(4, inn // 200)]] = 20.0
    acc = ak.GramAccumulator(inn)
    for start in range(0, nsamples, chunk):
        n = min(chunk, nsamples - start)
        x = torch.randn(n, rank, generator=g) @ mix + 0.5 * torch.randn(n, inn, generator=g)
        acc.add(x * scale)
    return acc.gram


def layer_weight(out: int, inn: int, seed: int) -> torch.Tensor:
    """Weight (out, in) fp32: Gaussian with per-row scales (rows of a trained layer differ in norm)."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(out, inn, generator=g) * (0.02 * (1 + torch.rand(out, 1, generator=g)))


def machine_figures(G: torch.Tensor, out: int, reps: int) -> dict:
    """fp32 GEMM (in, in) x (in, out) and Cholesky (in, in) times measured now, on this machine."""
    inn = G.shape[0]
    a = torch.randn(inn, inn)
    b = torch.randn(inn, out)
    c = torch.empty(inn, out)
    torch.mm(a, b, out=c)  # warm-up
    t_gemm = best_time(lambda: torch.mm(a, b, out=c), reps)
    d = G.diagonal().sqrt() + 1e-8
    A = G / d[:, None] / d[None, :]
    A.diagonal().add_(1.1)
    torch.linalg.cholesky(A)
    t_chol = best_time(lambda: torch.linalg.cholesky(A), reps)
    return {"gemm_s": t_gemm, "gemm_gflops": 2 * inn * inn * out / t_gemm / 1e9, "cholesky_s": t_chol}


def run(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    for out, inn in parse_shapes(args.shapes):
        if args.gram:
            G = torch.load(args.gram, map_location="cpu").float()
            if G.shape != (inn, inn):
                raise SystemExit(f"--gram has shape {tuple(G.shape)}, shape {out}x{inn} needs ({inn}, {inn})")
        else:
            G = calibration_gram(inn, args.nsamples, args.seed)
        W = layer_weight(out, inn, args.seed)
        fig = machine_figures(G, out, args.reps)
        print(f"\n## {out}x{inn}: fp32 GEMM (in,in)x(in,out) {fig['gemm_s']:.3f} s = "
              f"{fig['gemm_gflops']:.1f} GFLOP/s; Cholesky (in,in) {fig['cholesky_s']:.3f} s", flush=True)
        specs = parse_methods(args.methods, "--methods")
        runs = [(spec, False) for spec in specs]
        if args.reference:
            runs += [(spec, True) for spec in specs if spec.label == "admm"]
        for pattern in parse_list(args.patterns):
            sparsities = [0.5] if ":" in pattern else [float(s) for s in parse_list(args.sparsities)]
            for s in sparsities:
                for spec, extra in runs:
                    method = spec.method
                    opts = dict(spec.options)
                    if args.iters is not None and spec.is_admm and not {"iters", "preset"} & set(opts):
                        opts["iters"] = args.iters
                    label = spec.label + (" (reference ops)" if extra else "")
                    old = os.environ.get("ADMM_KERNELS_BACKEND")
                    if extra:
                        os.environ["ADMM_KERNELS_BACKEND"] = "reference"
                    try:
                        t = time.perf_counter()
                        res = ak.prune_layer(W, G, s, pattern, method=method, **opts)
                        seconds = time.perf_counter() - t
                    finally:
                        if extra:
                            if old is None:
                                os.environ.pop("ADMM_KERNELS_BACKEND", None)
                            else:
                                os.environ["ADMM_KERNELS_BACKEND"] = old
                    row = {"shape": f"{out}x{inn}", "method": label, "pattern": pattern,
                           "sparsity": round(res.stats["target_sparsity"], 4), "seconds": round(seconds, 3),
                           "error": res.error, "gemm_gflops": round(fig["gemm_gflops"], 1),
                           # the method alone: prune_layer's total includes evaluating the error (one GEMM)
                           "method_seconds": round(seconds - res.stats["seconds"].get("error", 0.0), 3)}
                    if method == "admm" and res.stats.get("iterations"):
                        sec = res.stats["seconds"]
                        loop = sec.get("iterations", 0.0) + sec.get("mask", 0.0)
                        n_it = res.stats["iterations"]
                        loop_gflops = 2 * inn * inn * out * n_it / loop / 1e9 if loop > 0 else 0.0
                        row["loop_fraction_of_matmul"] = round(loop_gflops / fig["gemm_gflops"], 3)
                        row["vs_gemms_plus_cholesky"] = round(
                            seconds / (n_it * fig["gemm_s"] + fig["cholesky_s"]), 3)
                        used = sorted(res.stats["backends"].items())
                        row["backends"] = ";".join(f"{k}={v}" for k, v in used)
                    rows.append(row)
                    extra_txt = (f"  loop {row['loop_fraction_of_matmul']:.2f} of matmul, "
                                 f"{row['vs_gemms_plus_cholesky']:.2f}x GEMMs+Cholesky"
                                 if "loop_fraction_of_matmul" in row else "")
                    print(f"{row['shape']:>11} {label:<24} {pattern:<12} s={row['sparsity']:<5} "
                          f"{seconds:8.2f} s  error {res.error:.5f}{extra_txt}", flush=True)
    return rows


COLUMNS = ["shape", "method", "pattern", "sparsity", "seconds", "method_seconds", "error", "gemm_gflops",
           "loop_fraction_of_matmul", "vs_gemms_plus_cholesky", "backends"]


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    head = (f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; nsamples {args.nsamples}, "
            f"seed {args.seed}\n\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = r.get(c, "")
            cells.append(f"{v:.5f}" if c == "error" else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sub = [r for r in rows if r["shape"] == shape]
        keys = sorted({(r["pattern"], r["sparsity"]) for r in sub})
        methods = list(dict.fromkeys(r["method"] for r in sub))
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            vals = [next((r["error"] for r in sub if r["method"] == m and (r["pattern"], r["sparsity"]) == k),
                         float("nan")) for k in keys]
            ax.bar([j + i * width for j in range(len(keys))], vals, width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels([f"{p}\n{s}" if ":" not in p else p for p, s in keys], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("relative reconstruction error")
        ax.set_title(shape)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def pareto_panels(rows: list[dict]) -> dict[str, list[tuple[str, float, float]]]:
    """One Pareto panel per shape x pattern x sparsity: (method label, method seconds, error)."""
    panels: dict[str, list] = {}
    for r in rows:
        title = f"{r['shape']} {r['pattern']}" + ("" if ":" in r["pattern"] else f" {r['sparsity']:g}")
        panels.setdefault(title, []).append((r["method"], r["method_seconds"], r["error"]))
    return panels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,4096x11008", help="comma-separated OUTxIN")
    p.add_argument("--methods", default="admm,sparsegpt,wanda,magnitude",
                   help="method specs as admm-prune bench takes them (any registered method, e.g. alps, and "
                        "NAME:key=value options such as admm:preset=NAME or admm:iters=5); separated by ';' "
                        "when a spec has options, else by commas (default %(default)s)")
    p.add_argument("--patterns", default="unstructured,per-row,2:4")
    p.add_argument("--sparsities", default="0.5", help="for unstructured/per-row (N:M fixes its own)")
    p.add_argument("--nsamples", type=int, default=16384, help="calibration tokens (rows of X)")
    p.add_argument("--gram", help="a saved (in, in) Gram (torch.save) instead of synthetic inputs")
    p.add_argument("--iters", type=int, default=None,
                   help="ADMM iterations for admm specs that do not set iters (default: the method's 20)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the GEMM/Cholesky timings (best)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", action="store_true", help="also time ADMM on the pure-torch reference ops")
    p.add_argument("--out", help="folder for results.csv, results.md, errors.png, pareto.png")
    args = p.parse_args(argv)
    if args.nsamples <= 0:
        p.error(f"--nsamples must be positive, got {args.nsamples}")
    rows = run(args)
    md = markdown(rows, args)
    print("\n" + md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})
        atomic_write_bytes(out / "results.csv", buf.getvalue().encode())
        atomic_write_bytes(out / "results.md", md.encode())
        if plot(rows, out / "errors.png") and plot_pareto(pareto_panels(rows), out / "pareto.png",
                                                          xlabel="method seconds", ylabel="relative error"):
            print(f"wrote {out}/results.csv, results.md, errors.png, pareto.png")
        else:
            print(f"wrote {out}/results.csv, results.md (no matplotlib: no plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
