"""Sparse inference on the CPU: packed 2:4 and 90 % unstructured matmul vs dense fp32 and torch CSR,
and end-to-end greedy decoding tokens/s of a model dense vs 2:4.

    python benchmarks/sparse_bench.py --out benchmarks/results/sparse          # full (lead, serially)
    python benchmarks/sparse_bench.py --shapes 512x512 --batches 1,4 --reps 5 --no-e2e --out /tmp/sb  # check
    python benchmarks/sparse_bench.py --gpu --no-e2e --out /tmp/sb_gpu   # + CUDA 2:4 vs cuBLAS (H200)

Shapes are (out, in) of LLaMA-7B's linears by default. Times are medians of --reps calls after a warm-up,
with torch's thread count as set by --threads. Writes <out>.md and <out>.json (atomically).
Targets (measured, not asserted): 2:4 at batch 1 >= 1.4x the fastest dense fp32 path;
unstructured 90 % >= 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from admm_kernels._io import atomic_write_text
from admm_kernels.backends import cpu
from admm_kernels.sparse import PackedCSR, PackedNM, SparseLinear, sparsify

DEFAULT_SHAPES = "4096x4096,11008x4096,4096x11008"


def timeit(fn, reps: int) -> float:
    """Median seconds of `reps` calls after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_24(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A random fp32 weight with the 2 largest magnitudes of every 4 kept."""
    w = torch.randn(rows, cols, generator=gen)
    g = w.view(rows, cols // 4, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.abs().topk(2, dim=2).indices, True)
    return (g * keep).view(rows, cols)


def bench_layer(rows: int, cols: int, batch: int, sparsity: float, reps: int, gen: torch.Generator) -> dict:
    w = torch.randn(rows, cols, generator=gen)
    w24 = random_24(rows, cols, gen)
    wu = w * (torch.rand(rows, cols, generator=gen) >= sparsity)
    x = torch.randn(batch, cols, generator=gen)
    p24 = PackedNM.pack(w24, 2, 4)
    p24h = PackedNM.pack(w24.half(), 2, 4)
    pu = PackedCSR.pack(wu)
    csr24, csru = w24.to_sparse_csr(), wu.to_sparse_csr()
    xt = x.T.contiguous()
    ops = torch.ops.admm_kernels
    row = {"shape": f"{rows}x{cols}", "batch": batch}
    row["dense_fp32_ms"] = 1e3 * timeit(lambda: F.linear(x, w), reps)
    row["ours_24_fp32_ms"] = 1e3 * timeit(lambda: ops.sparse_nm_mm(x, p24.values, p24.meta, 2, 4, cols), reps)
    row["ours_24_fp16_ms"] = 1e3 * timeit(
        lambda: ops.sparse_nm_mm(x, p24h.values, p24h.meta, 2, 4, cols), reps)
    row["torch_csr_24_ms"] = 1e3 * timeit(lambda: csr24 @ xt, reps)
    row[f"ours_csr{sparsity:.0%}_ms"] = 1e3 * timeit(
        lambda: ops.csr_mm(x, pu.crow, pu.col, pu.values, cols), reps)
    row[f"torch_csr{sparsity:.0%}_ms"] = 1e3 * timeit(lambda: csru @ xt, reps)
    d = row["dense_fp32_ms"]
    row["speedup_24_fp32"] = d / row["ours_24_fp32_ms"]
    row["speedup_24_fp16"] = d / row["ours_24_fp16_ms"]
    row["speedup_unstructured"] = d / row[f"ours_csr{sparsity:.0%}_ms"]
    # Memory-bound view: bytes the dense GEMV reads vs what 2:4 reads, and the bandwidth we reach.
    row["ours_24_fp32_GBps"] = (p24.nbytes() + x.numel() * 4) / (row["ours_24_fp32_ms"] * 1e-3) / 1e9
    row["dense_fp32_GBps"] = (w.numel() * 4 + x.numel() * 4) / (d * 1e-3) / 1e9
    return row


def load_default_model(path: str | None):
    try:
        from admm_kernels.models.loading import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        model, _, _ = load_model(path, dtype=torch.float32, with_tokenizer=False)
        return model
    if path is None:
        raise SystemExit("--model PATH is needed (admm_kernels.models.loading is not available)")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def bench_decode(model_path: str | None, new_tokens: int, prompt_len: int) -> dict:
    """Greedy-decoding tokens/s of the model magnitude-pruned to 2:4: dense vs SparseLinear fp32/fp16."""
    model = load_default_model(model_path)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head" and mod.in_features % 4 == 0:
                g = mod.weight.view(mod.out_features, -1, 4)
                keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.abs().topk(2, dim=2).indices, True)
                mod.weight.mul_(keep.view_as(mod.weight))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen)
    out = {"new_tokens": new_tokens, "prompt_len": prompt_len}

    def run(m):
        with torch.no_grad():
            m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
            t0 = time.perf_counter()
            toks = m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            return new_tokens / (time.perf_counter() - t0), toks

    out["dense_tok_s"], dense_toks = run(model)
    sparse = sparsify(model, "2:4")
    out["sparse_layers"] = sum(isinstance(m, SparseLinear) for m in sparse.modules())
    out["sparse_fp32_tok_s"], sparse_toks = run(sparse)
    out["same_tokens_fp32"] = bool(torch.equal(dense_toks, sparse_toks))
    del sparse
    sparse16 = sparsify(model, "2:4", dtype=torch.float16)
    out["sparse_fp16_storage_tok_s"], _ = run(sparse16)
    out["speedup_fp32"] = out["sparse_fp32_tok_s"] / out["dense_tok_s"]
    out["speedup_fp16_storage"] = out["sparse_fp16_storage_tok_s"] / out["dense_tok_s"]
    return out


def bench_gpu(shapes: list[tuple[int, int]], batches: list[int], reps: int) -> list[dict]:
    """CUDA: fp16 2:4 through torch's semi-structured sparse tensors vs dense cuBLAS (F.linear)."""
    from torch.sparse import to_sparse_semi_structured

    def cuda_time(fn) -> float:
        fn()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / reps  # ms

    rows_out = []
    gen = torch.Generator().manual_seed(0)
    for rows, cols in shapes:
        w = random_24(rows, cols, gen).half().cuda()
        ws = to_sparse_semi_structured(w)
        for b in batches:
            x = torch.randn(b, cols, generator=gen).half().cuda()
            d = cuda_time(lambda x=x, w=w: F.linear(x, w))
            s = cuda_time(lambda x=x, ws=ws: F.linear(x, ws))
            rows_out.append({"shape": f"{rows}x{cols}", "batch": b, "dense_fp16_ms": d, "semi_24_fp16_ms": s,
                             "speedup": d / s})
    return rows_out


def markdown(res: dict) -> str:
    sp = res["args"]["sparsity"]
    lines = [f"# Sparse inference on the CPU ({res['machine']}, {res['threads']} threads, {res['date']})", "",
             "Times in ms (median). Speed-ups are vs dense fp32 `F.linear` in the same run.", "",
             f"| shape (out x in) | batch | dense fp32 | ours 2:4 fp32 | ours 2:4 fp16 | torch CSR 2:4 | "
             f"ours CSR {sp:.0%} | torch CSR {sp:.0%} | 2:4 fp32 x | 2:4 fp16 x | CSR {sp:.0%} x |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["layers"]:
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['dense_fp32_ms']:.2f} | {r['ours_24_fp32_ms']:.2f} | "
            f"{r['ours_24_fp16_ms']:.2f} | {r['torch_csr_24_ms']:.2f} | {r[f'ours_csr{sp:.0%}_ms']:.2f} | "
            f"{r[f'torch_csr{sp:.0%}_ms']:.2f} | {r['speedup_24_fp32']:.2f} | {r['speedup_24_fp16']:.2f} | "
            f"{r['speedup_unstructured']:.2f} |")
    if res.get("decode"):
        d = res["decode"]
        lines += ["", "## Greedy decoding (2:4 magnitude-pruned model, batch 1)", "",
                  "| dense fp32 tok/s | SparseLinear fp32 tok/s | SparseLinear fp16-storage tok/s | "
                      "same tokens |",
                  "|---|---|---|---|",
                  f"| {d['dense_tok_s']:.1f} | {d['sparse_fp32_tok_s']:.1f} ({d['speedup_fp32']:.2f}x) | "
                  f"{d['sparse_fp16_storage_tok_s']:.1f} ({d['speedup_fp16_storage']:.2f}x) | "
                      f"{d['same_tokens_fp32']} |"]
    if res.get("gpu"):
        lines += ["", "## CUDA: fp16 2:4 semi-structured vs dense cuBLAS (ms)", "",
                  "| shape | batch | dense | 2:4 | speed-up |", "|---|---|---|---|---|"]
        lines += [f"| {g['shape']} | {g['batch']} | {g['dense_fp16_ms']:.3f} | {g['semi_24_fp16_ms']:.3f} | "
                  f"{g['speedup']:.2f} |" for g in res["gpu"]]
    return "\n".join(lines) + "\n"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        try:
            rows, cols = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: expected OUTxIN[,OUTxIN...], got {part!r}") from None
        if rows <= 0 or cols <= 0 or cols % 4:
            raise SystemExit(f"--shapes: {part!r} needs positive sizes and IN divisible by 4")
        shapes.append((rows, cols))
    return shapes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="OUTxIN list (default: LLaMA-7B linears)")
    ap.add_argument("--batches", default="1,4,16", help="rows of activations")
    ap.add_argument("--sparsity", type=float, default=0.9, help="unstructured sparsity")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end decode benchmark")
    ap.add_argument("--model", default=None, help="model folder (default: the packaged SmolLM2)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--gpu", action="store_true",
                    help="also CUDA fp16 2:4 (semi-structured) vs dense cuBLAS at --gpu-batches")
    ap.add_argument("--gpu-batches", default="1,4,16,64,256,1024,4096")
    ap.add_argument("--out", required=True, help="output prefix: writes OUT.md and OUT.json")
    args = ap.parse_args(argv)
    if not cpu.has_sparse_kernels():
        raise SystemExit(f"the C++ sparse kernels are not built ({cpu.unavailable_reason()}); run "
            "`make build`")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator().manual_seed(0)
    machine = f"{platform.processor() or platform.machine()}, "
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine
           + f"{os.cpu_count()} CPUs", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "args": vars(args), "layers": []}
    for rows, cols in parse_shapes(args.shapes):
        for b in batches:
            r = bench_layer(rows, cols, b, args.sparsity, args.reps, gen)
            res["layers"].append(r)
            print(json.dumps(r), file=sys.stderr)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device")
        gpu_batches = [int(b) for b in args.gpu_batches.split(",")]
        res["gpu"] = bench_gpu(parse_shapes(args.shapes), gpu_batches, args.reps)
    if not args.no_e2e:
        res["decode"] = bench_decode(args.model, args.new_tokens, args.prompt_len)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=2))
    md = markdown(res)
    atomic_write_text(out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
