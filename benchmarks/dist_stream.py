"""Distributed and streaming pipeline benchmarks, each writing JSON and a markdown table:

    python benchmarks/dist_stream.py ranks --out DIR     1 rank x 2 threads against 2 ranks x 1 thread
                                                         (torchrun, gloo) pruning the embedded SmolLM2
    python benchmarks/dist_stream.py rss --out DIR       peak RSS of `admm-prune prune` on random
                                                         LLaMA-shaped checkpoints of one width with 8 and
                                                         16 blocks, streamed (--stream) and in memory
    python benchmarks/dist_stream.py project --ranks DIR/ranks.json --out DIR
                                                         projected ADMM-Grad time for LLaMA-2-7B / 70B on
                                                         1 and 8 H200s, from the measured per-block costs

Each command runs in its own processes with explicit thread counts (OMP_NUM_THREADS and --threads), and
ratios are taken within one invocation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's admm_kernels (and its commit), not an installed one


def _machine() -> dict:
    from admm_kernels.bench.machine import git_commit

    sha = git_commit()["commit"]
    return {"date": datetime.date.today().isoformat(), "commit": sha[:7] if sha else None,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], threads: int) -> tuple[float, dict]:
    """(wall seconds, rusage of the process tree's largest member) of a command, output shown."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(threads))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return wall, {"max_rss_mib": usage.ru_maxrss / 1024, "user_s": usage.ru_utime, "sys_s": usage.ru_stime}


# --- ranks ---------------------------------------------------------------------------------------------

RANK_RUNS = ("1 rank x 2 threads", "2 ranks x 1 thread", "1 rank x 1 thread")


def _compare_outputs(folder_a: str, report_a: dict, folder_b: str, report_b: dict) -> dict:
    """How far two pruned outputs of the same model are apart."""
    from admm_kernels.models.loading import load_model

    wa, _, _ = load_model(folder_a, with_tokenizer=False)
    wb, _, _ = load_model(folder_b, with_tokenizer=False)
    sa, sb = wa.state_dict(), wb.state_dict()
    keys = [k for k in sa if sa[k].dim() == 2 and k in {f"{r['name']}.weight" for r in report_a["layers"]}]
    return {"max_relative_weight_difference": max(float((sb[k] - sa[k]).norm() / sa[k].norm()) for k in keys),
            "mask_entries_differing": sum(int(((sb[k] == 0) != (sa[k] == 0)).sum()) for k in keys),
            "mask_entries": sum(sa[k].numel() for k in keys),
            "max_relative_error_difference": max(abs(x["error"] - y["error"]) / x["error"]
                                                 for x, y in zip(report_a["layers"], report_b["layers"])),
            "first_block_error_difference": max(abs(x["error"] - y["error"]) / x["error"]
                                                for x, y in zip(report_a["layers"], report_b["layers"])
                                                if x["block"] == 0)}


def cmd_ranks(args) -> dict:
    import torch

    out = Path(args.out)
    common = ["prune", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--eval-windows",
              str(args.eval_windows), "--quiet", "--overwrite"]
    single = [sys.executable, "-m", "admm_kernels", *common]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(_free_port()), "-m", "admm_kernels", *common]
    commands = {RANK_RUNS[0]: ([*single, "--threads", "2", "--out", str(out / "r1t2")], 2),
                RANK_RUNS[1]: ([*torchrun, "--threads", "1", "--out", str(out / "r2t1")], 1),
                RANK_RUNS[2]: ([*single, "--threads", "1", "--out", str(out / "r1t1")], 1)}
    runs = {}
    try:
        for name, (cmd, threads) in commands.items():
            print(f"== {name}: {' '.join(cmd)}", flush=True)
            wall, _ = _run(cmd, threads)
            folder = Path(cmd[-1])
            runs[name] = {"wall_seconds": wall, "folder": str(folder),
                          "report": json.loads((folder / "prune_report.json").read_text())}
        two = runs[RANK_RUNS[1]]
        compared = {other: _compare_outputs(runs[other]["folder"], runs[other]["report"], two["folder"],
                                            two["report"]) for other in (RANK_RUNS[0], RANK_RUNS[2])}
    finally:
        for run in runs.values():
            shutil.rmtree(run["folder"], ignore_errors=True)
    return {"machine": _machine(), "torch": torch.__version__, "nsamples": args.nsamples,
            "seqlen": args.seqlen, "eval_windows": args.eval_windows,
            "runs": {k: {"wall_seconds": v["wall_seconds"], "timings": v["report"]["timings"],
                         "ranks": v["report"].get("ranks"), "perplexity": v["report"]["perplexity"],
                         "layers": v["report"]["layers"]} for k, v in runs.items()},
            "time_ratio_two_ranks_over": {k: two["wall_seconds"] / runs[k]["wall_seconds"]
                                          for k in (RANK_RUNS[0], RANK_RUNS[2])},
            "two_ranks_against": compared}


def ranks_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"SmolLM2-135M, ADMM-Grad 50 %, {r['nsamples']} x {r['seqlen']} calibration tokens, "
             f"{r['eval_windows']} evaluation windows, run one after the other; {m['date']}, commit "
             f"{m['commit']}, load average at the end {m['load_average']} (the 2 cores were shared).", "",
             "| run | wall s | prune s | forward s | Gram s | solve s | comm s | ppl before | ppl after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, run in r["runs"].items():
        t, p = run["timings"], run["perplexity"]
        label = name.replace(" x ", " × ") + (" (rank 0)" if run.get("ranks") else "")
        lines.append(f"| {label} | {run['wall_seconds']:.1f} | {t['total']:.1f} | {t['forward']:.1f} | "
                     f"{t['gram']:.1f} | {t['solve']:.1f} | {t.get('comm', 0.0):.1f} | {p['before']:.4f} | "
                     f"{p['after']:.4f} |")
        for extra in (run.get("ranks") or [])[1:]:
            e = extra["timings"]
            lines.append(f"| (rank {extra['rank']}) | | {e['total']:.1f} | {e['forward']:.1f} | "
                         f"{e['gram']:.1f} | {e['solve']:.1f} | {e['comm']:.1f} | | |")
    lines.append("")
    for other, ratio in r["time_ratio_two_ranks_over"].items():
        c = r["two_ranks_against"][other]
        lines.append(f"- 2 ranks × 1 thread against {other.replace(' x ', ' × ')}: wall-time ratio "
                     f"**{ratio:.2f}**; block 0's layer errors differ by at most "
                     f"{c['first_block_error_difference']:.1e} (relative), over all 30 blocks by "
                     f"{c['max_relative_error_difference']:.1e}; largest relative weight difference of a "
                     f"layer {c['max_relative_weight_difference']:.1e}; {c['mask_entries_differing']} of "
                     f"{c['mask_entries']} mask entries differ.")
    return "\n".join(lines)


# --- rss -----------------------------------------------------------------------------------------------

def _random_llama(folder: Path, layers: int, hidden: int, intermediate: int, tokenizer_from: Path) -> int:
    """A random LLaMA-shaped checkpoint with the tokenizer of `tokenizer_from`; returns one block's bytes."""
    import torch
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(tokenizer_from)
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                            num_hidden_layers=layers, num_attention_heads=hidden // 64,
                            num_key_value_heads=hidden // 64, max_position_embeddings=2048,
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())


def cmd_rss(args) -> dict:
    from admm_kernels.models.loading import default_model_path

    root = Path(tempfile.mkdtemp(prefix="rss-", dir=args.tmp))
    runs, block_bytes = {}, None
    try:
        for layers in (8, 16):
            folder = root / f"llama-{layers}"
            block_bytes = _random_llama(folder, layers, args.hidden, args.intermediate, default_model_path())
            for stream in (False, True):
                cmd = [sys.executable, "-m", "admm_kernels", "prune", str(folder), "--method", args.method,
                       "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--eval-windows", "4",
                       "--threads", str(args.threads), "--quiet", "--out", str(root / "out"), "--overwrite",
                       *(["--stream"] if stream else [])]
                print(f"== {layers} blocks, {'streamed' if stream else 'in memory'}", flush=True)
                wall, usage = _run(cmd, args.threads)
                runs[f"{layers}-{'stream' if stream else 'memory'}"] = {"wall_seconds": wall, **usage}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mib = block_bytes / 2**20
    growth = {k: (runs[f"16-{k}"]["max_rss_mib"] - runs[f"8-{k}"]["max_rss_mib"]) / mib
              for k in ("memory", "stream")}
    return {"machine": _machine(), "hidden": args.hidden, "intermediate": args.intermediate,
            "method": args.method, "nsamples": args.nsamples, "seqlen": args.seqlen, "threads": args.threads,
            "block_mib": mib, "runs": runs, "growth_in_blocks_from_8_to_16": growth}


def rss_markdown(r: dict) -> str:
    lines = [f"Random LLaMA-shaped fp32 checkpoints, hidden {r['hidden']}, intermediate {r['intermediate']} "
             f"(one block = {r['block_mib']:.1f} MiB), SmolLM2's vocabulary, untied head; `admm-prune prune "
             f"--method {r['method']} --nsamples {r['nsamples']} --seqlen {r['seqlen']} --eval-windows 4 "
             f"--threads {r['threads']}` (perplexity before and after included); peak RSS from wait4; "
             f"{r['machine']['date']}, commit {r['machine']['commit']}.", "",
             "| blocks | in memory: peak RSS MiB | streamed: peak RSS MiB | in memory s | streamed s |",
             "|---|---|---|---|---|"]
    for n in (8, 16):
        m, s = r["runs"][f"{n}-memory"], r["runs"][f"{n}-stream"]
        lines.append(f"| {n} | {m['max_rss_mib']:.0f} | {s['max_rss_mib']:.0f} | {m['wall_seconds']:.1f} | "
                     f"{s['wall_seconds']:.1f} |")
    g = r["growth_in_blocks_from_8_to_16"]
    lines += ["", f"From 8 to 16 blocks the peak grows by **{g['memory']:.2f} blocks' bytes in memory** and "
              f"**{g['stream']:.2f} blocks' bytes streamed** (target: < 3)."]
    return "\n".join(lines)


# --- project -------------------------------------------------------------------------------------------

# Published H200 SXM dense peaks (NVIDIA datasheet): FP32 67 TFLOP/s, TF32 tensor 495, BF16 tensor 989;
# HBM3e 4.8 TB/s; NVLink 900 GB/s per GPU (both directions together).
H200 = {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "nvlink_bus": 450e9}
SHAPES = {  # name: (blocks, hidden, intermediate, heads, kv heads)
    "SmolLM2-135M": (30, 576, 1536, 9, 3),
    "LLaMA-2-7B": (32, 4096, 11008, 32, 32),
    "LLaMA-2-70B": (80, 8192, 28672, 64, 8),
}


def _layers(name: str) -> list[tuple[str, int, int]]:
    """(layer, out, in) of one block."""
    _, h, inter, heads, kv = SHAPES[name]
    kvd = h // heads * kv
    return [("q", h, h), ("k", kvd, h), ("v", kvd, h), ("o", h, h), ("gate", inter, h), ("up", inter, h),
            ("down", h, inter)]


def block_flops(name: str, tokens: int, seqlen: int) -> dict:
    """FLOPs of one block's work: forward (one pass, attention included), Gram (one triangle per group),
    ADMM-Grad solve (20 iterations of one (in,in)x(in,out) GEMM + a Cholesky-based inverse per layer)."""
    layers = _layers(name)
    _, h, *_ = SHAPES[name]
    forward = sum(2 * o * i for _, o, i in layers) * tokens + 4 * seqlen * h * tokens
    groups = {"qkv": h, "o": h, "gateup": h, "down": SHAPES[name][2]}
    gram = sum(tokens * i * i for i in groups.values())
    gemms = sum(20 * 2 * i * i * o for _, o, i in layers)
    factor = sum(i ** 3 for _, _, i in layers)
    return {"forward": forward, "gram": gram, "solve": gemms + factor, "largest_layer_solve":
            max(20 * 2 * i * i * o + i ** 3 for _, o, i in layers),
            "gram_bytes": 4 * sum(i * i for i in groups.values()),
            "weight_bytes_bf16": 2 * sum(o * i for _, o, i in layers),
            "state_bytes_bf16": 2 * sum(o * i for _, o, i in layers) + 2 * tokens * h}


def cmd_project(args) -> dict:
    ranks = json.loads(Path(args.ranks).read_text())
    run = ranks["runs"]["1 rank x 1 thread"]
    t = run["timings"]
    n_blocks = SHAPES["SmolLM2-135M"][0]
    tokens = ranks["nsamples"] * ranks["seqlen"]
    f = block_flops("SmolLM2-135M", tokens, ranks["seqlen"])
    # Measured on this CPU: achieved FLOP rate of each phase (forward counts ~1.8 passes: the Gram pass
    # stops after the last selected layer's input, the propagation pass is whole).
    passes = 1.8
    cpu = {"forward": passes * f["forward"] * n_blocks / t["forward"],
           "gram": f["gram"] * n_blocks / t["gram"], "solve": f["solve"] * n_blocks / t["solve"]}
    # Efficiency assumptions on the H200: 60 % of the bf16 peak for the forward GEMMs (2048-token windows,
    # batch 1), 60 % of the fp32 / tf32 peak for Gram and ADMM GEMMs (measured on this CPU: the ADMM loop
    # reaches 0.78-0.97 of the fp32 matmul rate, the whole prune_layer 1.23-1.47x its 20 GEMMs + Cholesky:
    # RESULTS.md "Layers"), so the solve gets 0.6 / 1.35 of the peak.
    eff_fwd, eff_gemm, overhead = 0.6, 0.6, 1.35
    # The resumable state (the CLI's default) writes each block's weights and the next block's
    # activations, fsync'ed and hashed: measured here ~0.14 s for 23 MB a block (~170 MB/s on this VM's
    # disk); assumed 1 GB/s on a GPU node's NVMe (write + SHA-256 of the written file).
    state_rate = 1e9
    state_bytes_here = (2 * f["weight_bytes_bf16"] + 4 * tokens * SHAPES["SmolLM2-135M"][1])  # fp32 run
    out = {"cpu_measured": {"per_block_seconds": {k: t[k] / n_blocks for k in ("forward", "gram", "solve",
                                                                               "state")},
                            "state_mb_per_block": state_bytes_here / 1e6,
                            "achieved_gflops": {k: v / 1e9 for k, v in cpu.items()}, "tokens": tokens},
           "assumptions": {"h200": H200, "forward_efficiency": eff_fwd, "gemm_efficiency": eff_gemm,
                           "solve_overhead": overhead, "passes": passes, "calibration": "128 x 2048 tokens",
                           "state_bytes_per_second": state_rate,
                           "model_dtype": "bf16", "gram_and_solve": ["fp32", "tf32"]},
           "projections": {}}
    for name in ("LLaMA-2-7B", "LLaMA-2-70B"):
        blocks = SHAPES[name][0]
        fl = block_flops(name, 128 * 2048, 2048)
        for precision in ("fp32", "tf32"):
            rate = H200[precision] * eff_gemm
            for gpus in (1, 8):
                fwd = passes * fl["forward"] / (H200["bf16"] * eff_fwd) / gpus
                gram = fl["gram"] / rate / gpus
                solve_total = overhead * fl["solve"] / rate
                # Layers are whole jobs: with 8 GPUs the block's solve takes at least its largest layer.
                solve = max(solve_total / gpus, overhead * fl["largest_layer_solve"] / rate)
                comm = (2 * (gpus - 1) / gpus * fl["gram_bytes"] + 1.5 * fl["weight_bytes_bf16"]) \
                    / H200["nvlink_bus"] if gpus > 1 else 0.0
                per_block = fwd + gram + solve + comm
                state = fl["state_bytes_bf16"] / state_rate
                out["projections"][f"{name} {precision} {gpus}"] = {
                    "model": name, "precision": precision, "gpus": gpus, "blocks": blocks,
                    "per_block_s": {"forward": fwd, "gram": gram, "solve": solve, "comm": comm,
                                    "state": state},
                    "total_minutes": per_block * blocks / 60,
                    "total_with_state_minutes": (per_block + state) * blocks / 60,
                    "allreduce_gib_per_block": fl["gram_bytes"] / 2**30,
                    "broadcast_gib_per_block": 1.5 * fl["weight_bytes_bf16"] / 2**30}
    # SparseGPT's published time: OPT-175B / BLOOM-176B in under 4.5 hours on one A100 80GB (Frantar &
    # Alistarh 2023, abstract). Scaled to LLaMA-2 by work, two bounds: forward-dominated (parameters) and
    # solve-dominated (sum over layers of in^3 + in^2 * out, SparseGPT's per-layer cost).
    opt = [("qkvo", 12288, 12288)] * 4 + [("fc1", 49152, 12288), ("fc2", 12288, 49152)]
    solve175 = 96 * sum(i ** 3 + i * i * o for _, o, i in opt)
    out["sparsegpt"] = {}
    for name, params in (("LLaMA-2-7B", 6.7e9), ("LLaMA-2-70B", 69e9)):
        s = SHAPES[name][0] * sum(i ** 3 + i * i * o for _, o, i in _layers(name))
        out["sparsegpt"][name] = {"by_parameters_minutes": 270 * params / 175e9,
                                  "by_solve_flops_minutes": 270 * s / solve175}
    return out


def project_markdown(r: dict) -> str:
    c = r["cpu_measured"]
    a = r["assumptions"]
    sec, rate, h = c["per_block_seconds"], c["achieved_gflops"], a["h200"]
    lines = ["Measured per-block costs (this CPU, SmolLM2, 1 rank × 1 thread, "
             f"{c['tokens']} calibration tokens): forward {sec['forward']:.2f} s, Gram {sec['gram']:.2f} s, "
             f"ADMM-Grad solves {sec['solve']:.2f} s, i.e. {rate['forward']:.0f} / {rate['gram']:.0f} / "
             f"{rate['solve']:.0f} GFLOP/s by the FLOP model below; state save {sec['state']:.2f} s for "
             f"{c['state_mb_per_block']:.0f} MB.", "",
             "Model (per block): forward = 2·params·tokens + 4·seqlen·hidden·tokens per pass, "
             f"{a['passes']} passes (the Gram pass stops after the last needed input, the propagation pass "
             "is whole); Gram = tokens·in² per input group (q/k/v, o, gate/up, down); solve = per layer 20 "
             f"GEMMs of 2·in²·out + in³ for the factor, × {a['solve_overhead']} (measured prune_layer "
             f"overhead on this CPU). H200: bf16 {h['bf16'] / 1e12:.0f}, TF32 {h['tf32'] / 1e12:.0f}, FP32 "
             f"{h['fp32'] / 1e12:.0f} TFLOP/s peak at {a['forward_efficiency']:.0%} (forward) / "
             f"{a['gemm_efficiency']:.0%} (Gram, solve); NVLink {h['nvlink_bus'] / 1e9:.0f} GB/s bus "
             "bandwidth per GPU for the Gram all-reduce (ring: 2(n−1)/n of the Grams) and the weight + mask "
             "broadcast (bf16 weights + 1-byte masks). 128 × 2048 calibration tokens, bf16 model; with 8 "
             "GPUs the windows split 8 ways, the 7 layers of a block are solved in parallel, so a block's "
             "solve takes at least its largest layer (down_proj).", "",
             "| model | Gram/solve precision | GPUs | forward s/block | Gram s/block | solve s/block | "
             "comm s/block | all-reduce GiB/block | total | state s/block | total with state |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in r["projections"].values():
        b = p["per_block_s"]
        total, with_state = (f"{m:.0f}" if m >= 10 else f"{m:.1f}"
                             for m in (p["total_minutes"], p["total_with_state_minutes"]))
        lines.append(f"| {p['model']} | {p['precision']} | {p['gpus']} | {b['forward']:.2f} | "
                     f"{b['gram']:.2f} | {b['solve']:.2f} | {b['comm']:.3f} | "
                     f"{p['allreduce_gib_per_block']:.2f} | {total} min | {b['state']:.1f} | "
                     f"{with_state} min |")
    s7, s70 = r["sparsegpt"]["LLaMA-2-7B"], r["sparsegpt"]["LLaMA-2-70B"]
    lines += ["", "SparseGPT, published: OPT-175B / BLOOM-176B in under 4.5 hours on one A100 80GB (Frantar "
              "& Alistarh 2023, arXiv 2301.00774, abstract). Scaled to LLaMA-2 (derived here, not "
              f"published): 7B {s7['by_solve_flops_minutes']:.1f}–{s7['by_parameters_minutes']:.0f} min, "
              f"70B {s70['by_solve_flops_minutes']:.0f}–{s70['by_parameters_minutes']:.0f} min on one A100 "
              "(lower bound: its per-layer solve work Σ in³ + in²·out; upper: its time proportional to the "
              "parameters, i.e. forward-dominated)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("ranks")
    r.add_argument("--nsamples", type=int, default=16)
    r.add_argument("--seqlen", type=int, default=256)
    r.add_argument("--eval-windows", type=int, default=16)
    r.add_argument("--out", required=True)
    m = sub.add_parser("rss")
    m.add_argument("--hidden", type=int, default=1024)
    m.add_argument("--intermediate", type=int, default=2816)
    m.add_argument("--method", default="wanda")
    m.add_argument("--nsamples", type=int, default=8)
    m.add_argument("--seqlen", type=int, default=128)
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--tmp", default=None, help="folder for the checkpoints (default: the temporary folder)")
    m.add_argument("--out", required=True)
    j = sub.add_parser("project")
    j.add_argument("--ranks", required=True, help="ranks.json of a `ranks` run")
    j.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run, md = {"ranks": (cmd_ranks, ranks_markdown), "rss": (cmd_rss, rss_markdown),
               "project": (cmd_project, project_markdown)}[args.command]
    result = run(args)
    from admm_kernels._io import atomic_write_text

    atomic_write_text(out / f"{args.command}.json", json.dumps(result, indent=2, default=str) + "\n")
    text = md(result)
    atomic_write_text(out / f"{args.command}.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
