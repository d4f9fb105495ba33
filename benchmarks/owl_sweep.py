"""Whole-model perplexity with uniform vs OWL sparsity across blocks (admm_kernels.models.owl), and a
sweep of OWL's M and λ.

Default: the embedded SmolLM2-135M with the sizes of the embedded `admm-prune prune` run (32 × 256
Shakespeare calibration tokens, seed 0; perplexity on 32 held-out windows of 256), 70 % unstructured.
For each method: the uniform run, then OWL at every (M, λ). The dense pre-pass runs once: its input
norms give the outlier ratios for every M and the allocation for every λ, passed to prune_model as a
per-block list; the published (M, λ) = (5, 0.08) runs through `sparsity_profile="owl"` itself and is
checked to give the same per-block sparsities as that shortcut.

    PYTHONPATH=. python benchmarks/owl_sweep.py --threads 1 --out /tmp/owl     # 70 %, published M, λ
    PYTHONPATH=. python benchmarks/owl_sweep.py --methods wanda --ms 3,5,7 \
        --lambdas 0.02,0.05,0.08,0.12 --out /tmp/owl                          # a sweep
    PYTHONPATH=. python benchmarks/owl_sweep.py --max-blocks 2 --nsamples 2 --seqlen 64 \
        --eval-windows 2 --out /tmp/o                                          # smoke check

Writes DIR/owl_sweep.json after every run (so a stopped sweep keeps what it measured) and
DIR/owl_sweep.md at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from admm_kernels._io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_quality import machine  # noqa: E402


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="transformers model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--sparsity", type=float, default=0.7, help="target sparsity (default 0.7)")
    p.add_argument("--methods", default="wanda,admm", help="comma-separated methods (default wanda,admm)")
    p.add_argument("--ms", type=_floats, default=[5.0], help="OWL M values (default 5, as published)")
    p.add_argument("--lambdas", type=_floats, default=[0.08],
                   help="OWL λ values (default 0.08, as published)")
    p.add_argument("--no-uniform", action="store_true", help="skip the uniform runs")
    p.add_argument("--mirrored", action="store_true",
                   help="also run each OWL allocation mirrored around the target (2s - s_b: blocks with "
                        "more outliers pruned MORE), a check of the direction OWL assumes")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--max-blocks", type=int, default=None,
                   help="prune only the first N blocks (smoke checks)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return args


def run(args, out: Path) -> dict:
    from admm_kernels import protocols, prune_model
    from admm_kernels.eval import evaluate_perplexity
    from admm_kernels.models import find_blocks, get_weight, load_model, prunable_layers
    from admm_kernels.models.owl import allocate, input_square_sums, outlier_ratio
    from admm_kernels.models.sparsity_profile import OWL_LAMBDA, OWL_M

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, path = load_model(args.model)
    calib = protocols.calibration_windows(tok, None, nsamples=args.nsamples, seqlen=args.seqlen,
                                          seed=args.seed)
    ev = protocols.evaluation_tokens(tok, None)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    blocks_name, blocks = find_blocks(model)
    n = len(blocks) if args.max_blocks is None else min(args.max_blocks, len(blocks))
    prefixes = tuple(f"{blocks_name}.{i}." for i in range(n))

    def layers(name, module):
        return name.startswith(prefixes)

    def ppl() -> float:
        return evaluate_perplexity(model, ev, seqlen=args.seqlen, max_windows=args.eval_windows)

    res = {"model": str(path), "sparsity": args.sparsity, "nsamples": args.nsamples, "seqlen": args.seqlen,
           "eval_windows": args.eval_windows, "blocks_pruned": n, "blocks": len(blocks), "seed": args.seed,
           "machine": machine(), "runs": []}
    t = time.perf_counter()
    res["dense_perplexity"] = ppl()
    print(f"dense: perplexity {res['dense_perplexity']:.3f} ({time.perf_counter() - t:.1f} s)", flush=True)

    # One dense pass: the input norms of every layer; ratios per M, allocations per λ.
    selected = [prunable_layers(b, f"{blocks_name}.{i}") if i < n else {} for i, b in enumerate(blocks)]
    t = time.perf_counter()
    with torch.no_grad():
        cpu = torch.device("cpu")
        sums = input_square_sums(model.eval(), blocks, selected, calib, cpu, cpu)
    res["dense_pass_seconds"] = time.perf_counter() - t
    weights = [sum(get_weight(m).numel() for r, m in sel.items() if r in s)
               for sel, s in zip(selected, sums)]
    ratios = {m: [outlier_ratio(sel, s, m) for sel, s in zip(selected, sums)] for m in args.ms}
    res["outlier_ratios"] = {str(m): r for m, r in ratios.items()}
    print(f"dense pass for the input norms: {res['dense_pass_seconds']:.1f} s", flush=True)

    def record(entry):
        res["runs"].append(entry)
        atomic_write_text(out / "owl_sweep.json", json.dumps(res, indent=1, default=str) + "\n")

    for method in args.methods:
        configs = ([] if args.no_uniform else [None]) + [
            (m, lam, mirrored) for m in args.ms for lam in args.lambdas
            for mirrored in ((False, True) if args.mirrored else (False,))]
        for cfg in configs:
            model.load_state_dict(dense_state)
            kwargs = {"sparsity": args.sparsity}
            planned = None
            if cfg is not None:
                planned = list(allocate(ratios[cfg[0]], weights, args.sparsity, cfg[1]))
                if cfg[2]:  # same weighted mean: Σ w (2s - s_b) = 2s Σ w - s Σ w
                    planned = [2 * args.sparsity - v for v in planned]
                    kwargs = {"sparsity": planned}
                elif cfg[:2] == (OWL_M, OWL_LAMBDA):  # the public path, checked against the shortcut
                    kwargs.update(sparsity_profile="owl")
                else:
                    kwargs = {"sparsity": planned}
            t = time.perf_counter()
            report = prune_model(model, calib, method=method, layers=layers, **kwargs)
            wall = time.perf_counter() - t
            got = report["sparsity_profile"]["block_sparsity"][:n]
            if planned is not None and got != planned[:n]:
                raise AssertionError(f"sparsity_profile='owl' gave {got}, the shortcut {planned[:n]}")
            value = ppl()
            label = "uniform" if cfg is None else \
                f"owl{' mirrored' if cfg[2] else ''} M={cfg[0]:g} λ={cfg[1]:g}"
            record({"method": method, "profile": label, "owl_m": None if cfg is None else cfg[0],
                    "owl_lambda": None if cfg is None else cfg[1],
                    "mirrored": None if cfg is None else cfg[2], "perplexity": value,
                    "block_sparsity": got, "achieved_sparsity": report["achieved_sparsity"],
                    "wall_seconds": wall, "timings": report["timings"],
                    "mean_layer_error": sum(r["error"] for r in report["layers"]) / len(report["layers"])})
            print(f"{method:>6} {label:<22} perplexity {value:9.3f}  achieved "
                  f"{report['achieved_sparsity']:.5f}  {wall:6.1f} s "
                  f"(profile {report['timings']['profile']:.1f} s)", flush=True)
    model.load_state_dict(dense_state)
    return res


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"SmolLM2 `{Path(res['model']).name}`, {res['blocks_pruned']}/{res['blocks']} blocks, "
             f"{res['sparsity']:.0%} unstructured; calibration {res['nsamples']} × {res['seqlen']} "
             f"(seed {res['seed']}); {res['eval_windows']} held-out windows of {res['seqlen']}; dense "
             f"perplexity {res['dense_perplexity']:.2f}. {m['date']}, commit {m['commit']}, {m['cores']} "
             f"cores, torch {m['torch']} with {m['torch_threads']} threads.", "",
             "| method | profile | perplexity | achieved sparsity | block sparsity min–max | seconds |",
             "|---|---|---|---|---|---|"]
    for r in res["runs"]:
        s = r["block_sparsity"]
        lines.append(f"| {r['method']} | {r['profile']} | {r['perplexity']:.2f} | "
                     f"{r['achieved_sparsity']:.5f} | {min(s):.3f}–{max(s):.3f} | {r['wall_seconds']:.0f} |")
    lines += ["", "Outlier ratios (% of the block's Wanda scores above M × their mean), blocks 0..N-1:", ""]
    for mval, ratios in res["outlier_ratios"].items():
        lines.append(f"- M={float(mval):g}: " + ", ".join(f"{100 * r:.2f}" for r in ratios if r is not None))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run(args, out)
    md = markdown(res)
    atomic_write_text(out / "owl_sweep.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
