"""The machine's roofline measured in the run (fp32 matmul GFLOP/s, copy GB/s) and the solver kernels
against it.

The measurements themselves (measure_peaks, best_time, ...) live in admm_kernels.bench.machine.

As a script:
    python benchmarks/roofline.py                      # the machine figures only
    python benchmarks/roofline.py --kernels            # + every kernel next to its plain-torch reference
    python benchmarks/roofline.py --kernels --rows 256 --cols 512 --gram-n 256 --gram-in 512   # quick check
Default sizes are realistic (a 4096 x 11008 layer, x 4096 x 4096 for the Gram) and take about a minute on
2 cores; each kernel line gives our time, the reference's time, the speed-up, and the fraction of the
copy bandwidth (element-wise and selection kernels: bytes they must move) or of the matmul peak (Gram:
the FLOPs of the half product it computes) measured in the same run.
"""

from __future__ import annotations

import argparse
import sys

import torch

from admm_kernels.bench.machine import COPY_BYTES, best_time, copy_gbps, matmul_gflops, measure_peaks  # noqa: F401

# --- kernels ------------------------------------------------------------------------------------------

def _kernel_rows(rows: int, cols: int, gram_n: int, gram_in: int, reps: int, peaks: dict) -> list[dict]:
    """One dict per kernel: name, ours (s), reference (s), the reference used, and the roofline fraction."""
    from admm_kernels import backends
    from admm_kernels.backends import reference as ref

    name = "cpu" if "cpu" in backends.available() else "reference"
    ours = backends.get(name)
    out = []
    bw = peaks["copy_gbps"] * 1e9
    peak = peaks["matmul_gflops"] * 1e9

    def add(kernel, t_ours, t_ref, ref_name, frac, unit):
        out.append({"kernel": kernel, "ours_s": t_ours, "ref_s": t_ref, "ref": ref_name,
                    "speedup": t_ref / t_ours, "fraction": frac, "of": unit})

    # Gram: the upper triangle of x^T x; reference = the full-product addmm (what one would write).
    x = torch.randn(gram_n, gram_in)
    G = torch.zeros(gram_in, gram_in)
    t_ours = best_time(lambda: ours.gram_update(G, x), reps)
    t_ref = best_time(lambda: G.addmm_(x.T, x), reps)
    half_flops = gram_n * gram_in * (gram_in + 1)  # 2 n in (in+1)/2
    add(f"gram_update x {gram_n}x{gram_in} fp32", t_ours, t_ref, "G.addmm_(x.T, x)",
        half_flops / t_ours / peak, "matmul peak")
    xb = x.bfloat16()
    t_ours = best_time(lambda: ours.gram_update(G, xb), reps)
    t_ref = best_time(lambda: G.addmm_(xb.T.float(), xb.float()), reps)
    add(f"gram_update x {gram_n}x{gram_in} bf16", t_ours, t_ref, "G.addmm_(x.T.float(), x.float())",
        half_flops / t_ours / peak, "matmul peak")

    # Per-layer top-k: exactly the reference contract vs torch.kthvalue (threshold only, no tie rule).
    s = torch.randn(rows, cols).abs()
    k = s.numel() // 2
    flat = s.view(-1)
    t_ours = best_time(lambda: ours.prune_mask(s, k, False), reps)
    t_ref = best_time(lambda: torch.kthvalue(flat, k), reps)
    # Bytes: the radix select reads the scores twice and once more to write the mask (4+4+4+1 per element).
    add(f"prune_mask per-layer {rows}x{cols}", t_ours, t_ref, "torch.kthvalue", 13 * s.numel() / t_ours / bw,
        "copy bandwidth (13 B/elt)")
    t_sort = best_time(lambda: ref.prune_mask(s, k, False), 1)
    add(f"prune_mask per-layer {rows}x{cols}", t_ours, t_sort, "reference (stable sort)",
        13 * s.numel() / t_ours / bw, "copy bandwidth (13 B/elt)")

    kr = cols // 2
    t_ours = best_time(lambda: ours.prune_mask(s, kr, True), reps)
    t_ref = best_time(lambda: torch.kthvalue(s, kr, dim=1), reps)
    add(f"prune_mask per-row {rows}x{cols}", t_ours, t_ref, "torch.kthvalue(dim=1)",
        5 * s.numel() / t_ours / bw, "copy bandwidth (5 B/elt)")

    cols4 = cols - cols % 4
    s4 = s[:, :cols4].contiguous()
    t_ours = best_time(lambda: ours.nm_mask(s4, 2, 4), reps)
    t_ref = best_time(lambda: ref.nm_mask(s4, 2, 4), 1)
    add(f"nm_mask 2:4 {rows}x{cols4}", t_ours, t_ref, "reference (sort per group)",
        5 * s4.numel() / t_ours / bw, "copy bandwidth (5 B/elt)")
    t_ours = best_time(lambda: ours.nm_mask(s4, 3, 4), reps)
    t_ref = best_time(lambda: s4.view(rows, -1, 4).topk(3, dim=2), reps)
    add(f"nm_mask 3:4 {rows}x{cols4}", t_ours, t_ref, "torch.topk(3) per group (values only)",
        5 * s4.numel() / t_ours / bw, "copy bandwidth (5 B/elt)")

    # Fused dual step: reads W, U, M, B, writes U, R (21 B per element in fp32).
    W, U, B = (torch.randn(rows, cols) for _ in range(3))
    M = torch.rand(rows, cols) < 0.5
    R = torch.empty_like(W)
    t_ours = best_time(lambda: ours.admm_dual_step(W, U, M, B, 1.0, R), reps)
    t_ref = best_time(lambda: ref.admm_dual_step(W, U, M, B, 1.0, R), reps)
    add(f"admm_dual_step {rows}x{cols}", t_ours, t_ref, "reference (5 torch ops)",
        21 * W.numel() / t_ours / bw, "copy bandwidth (21 B/elt)")
    for row in out:
        row["backend"] = name
    return out


def _print_peaks(peaks: dict) -> None:
    print(f"machine: {torch.get_num_threads()} threads; fp32 matmul {peaks['matmul_n']}^3: "
          f"{peaks['matmul_gflops']:.1f} GFLOP/s; copy {peaks['copy_bytes'] / 2**20:.0f} MiB: "
          f"{peaks['copy_gbps']:.1f} GB/s (read + write)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", action="store_true", help="also time every solver kernel vs its reference")
    p.add_argument("--rows", type=int, default=4096, help="layer rows for the mask and step kernels")
    p.add_argument("--cols", type=int, default=11008, help="layer columns for the mask and step kernels")
    p.add_argument("--gram-n", type=int, default=4096, help="rows of x for gram_update")
    p.add_argument("--gram-in", type=int, default=4096, help="features (columns of x, side of G)")
    p.add_argument("--matmul-n", type=int, default=2048, help="side of the fp32 GEMM measuring the peak")
    p.add_argument("--copy-mib", type=int, default=256, help="MiB copied to measure the bandwidth")
    p.add_argument("--reps", type=int, default=3, help="timed runs per measurement (the best is kept)")
    a = p.parse_args(argv)
    for flag in ("rows", "cols", "gram_n", "gram_in", "matmul_n", "copy_mib", "reps"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.cols < 4:
        p.error(f"--cols must be >= 4 (the N:M kernels use groups of 4), got {a.cols}")
    peaks = measure_peaks("cpu", n=a.matmul_n, copy_bytes=a.copy_mib * 2**20, reps=a.reps)
    _print_peaks(peaks)
    if a.kernels:
        rows = _kernel_rows(a.rows, a.cols, a.gram_n, a.gram_in, a.reps, peaks)
        print(f"backend: {rows[0]['backend']}")
        w = max(len(r["kernel"]) for r in rows)
        print(f"{'kernel':<{w}}  {'ours ms':>9}  {'ref ms':>9}  {'speed-up':>8}  {'roofline':>8}  "
              "reference / of")
        for r in rows:
            print(f"{r['kernel']:<{w}}  {r['ours_s'] * 1e3:9.2f}  {r['ref_s'] * 1e3:9.2f}  "
                  f"{r['speedup']:7.2f}x  {r['fraction']:8.1%}  {r['ref']} / {r['of']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
