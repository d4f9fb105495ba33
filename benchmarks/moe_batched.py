"""Batched expert solves against one expert at a time, and factorisations on a calm vs a loaded machine.

    python benchmarks/moe_batched.py --threads 2 --out /tmp/moe_batched          # the recorded run
    python benchmarks/moe_batched.py --experts 8 --shapes 256x512 --repeats 1    # a quick check

Part 1 (experts): for each shape OUTxIN and expert count E, E random experts with Grams built from
correlated inputs (4·in tokens each) are pruned by ADMM-Grad (the default options, 50 % unstructured)
twice in the same process: looped (admm_kernels.prune_layer per expert) and batched
(admm_kernels.batched.prune_experts); the ratio looped / batched of the best of --repeats runs is the
speed-up, and the masks must be identical (checked, reported). Shapes default to a small expert
(256x512) and Qwen3-30B-A3B's gate/up (768x2048) and down (2048x768).

Part 2 (--contention): the factorisation of a 1536x1536 Gram (Cholesky + cholesky_inverse, as
ADMM-Grad's W-update forms it) timed with the given torch thread count, on a calm machine and while
`--load` busy processes spin on the same cores, next to the same with torch limited to one thread.

Writes results.md and results.csv to --out (atomically) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import io
import multiprocessing as mp
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
from admm_kernels.batched import prune_experts  # noqa: E402


def experts(E: int, out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, out_f, in_f, generator=g) / in_f ** 0.5
    mix = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5 + torch.eye(in_f)
    grams = []
    for _ in range(E):
        X = torch.randn(4 * in_f, in_f, generator=g) @ mix
        grams.append(X.T @ X)
    return W, torch.stack(grams)


def best(fn, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def part_experts(shapes, counts, repeats) -> list[dict]:
    rows = []
    for out_f, in_f in shapes:
        for E in counts:
            W, G = experts(E, out_f, in_f)

            def looped_run(W=W, G=G):
                return [ak.prune_layer(w, g, 0.5) for w, g in zip(W, G)]
            looped_s, looped = best(looped_run, repeats)
            batched_s, batched = best(lambda W=W, G=G: prune_experts(W, G, 0.5, batched=True), repeats)
            same = all(torch.equal(a.mask, b.mask) for a, b in zip(looped, batched))
            rows.append({"part": "experts", "shape": f"{out_f}x{in_f}", "experts": E,
                         "looped_s": round(looped_s, 3), "batched_s": round(batched_s, 3),
                         "speedup": round(looped_s / batched_s, 3), "masks_identical": same})
            print(rows[-1], flush=True)
    return rows


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def _factor_time(n: int, threads: int, repeats: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2 * n, n, generator=g)
    A = X.T @ X + n * torch.eye(n)

    times = []
    for _ in range(repeats):  # min and max: under contention the slow tail is the point
        t = time.perf_counter()
        L, _ = torch.linalg.cholesky_ex(A)
        torch.cholesky_inverse(L)
        times.append(time.perf_counter() - t)
    return min(times), max(times)


def part_contention(threads: int, load: int, repeats: int, n: int = 1536) -> list[dict]:
    rows = []
    for state in ("calm", "loaded"):
        stop = mp.Event()
        procs = [mp.Process(target=_spin, args=(stop,)) for _ in range(load if state == "loaded" else 0)]
        for p in procs:
            p.start()
        try:
            for t in sorted({threads, 1}):
                lo, hi = _factor_time(n, t, repeats)
                rows.append({"part": "factor", "shape": f"{n}x{n}", "machine": state, "threads": t,
                             "seconds": round(lo, 4), "max_seconds": round(hi, 4)})
                print(rows[-1], flush=True)
        finally:
            stop.set()
            for p in procs:
                p.join()
    torch.set_num_threads(threads)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--shapes", default="256x512,768x2048,2048x768")
    ap.add_argument("--experts", default="8,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--contention", action="store_true", help="also run part 2")
    ap.add_argument("--load", type=int, default=3, help="busy processes for the loaded machine")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    counts = [int(v) for v in args.experts.split(",") if v]
    rows = part_experts(shapes, counts, args.repeats)
    if args.contention:
        rows += part_contention(args.threads, args.load, args.repeats)
    head = (f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads")
    lines = [f"# Batched expert solves ({head})", "",
             "| shape | experts | looped s | batched s | speed-up | masks identical |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['experts']} | {r['looped_s']} | {r['batched_s']} | {r['speedup']}x | "
              f"{r['masks_identical']} |" for r in rows if r["part"] == "experts"]
    fac = [r for r in rows if r["part"] == "factor"]
    if fac:
        lines += ["", "| factorisation | machine | threads | min s | max s |", "|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['machine']} | {r['threads']} | {r['seconds']} | {r['max_seconds']} |"
                  for r in fac]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "results.md", text.encode())
        buf = io.StringIO()
        keys = sorted({k for r in rows for k in r})
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        atomic_write_bytes(out / "results.csv", buf.getvalue().encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
