"""Whole-model quality and speed: perplexity of dense and of every method (magnitude / Wanda / SparseGPT /
ADMM-Grad / ALPS / the ADMM presets: any `admm-prune bench` method spec) at several sparsities and N:M
patterns, uniform or with an OWL sparsity profile, and the end-to-end time of each through the same
pipeline (forward passes, Gram accumulation, solves).

Default: the embedded SmolLM2-135M, calibrated on Shakespeare calibration plays and evaluated on the
held-out plays (admm_kernels.data). Every method sees the same calibration windows and the same
evaluation windows; the dense weights are restored between runs.

    python benchmarks/model_quality.py --out benchmarks/results/model_quality          # full run
    python benchmarks/model_quality.py --max-blocks 1 --nsamples 2 --seqlen 64 \\
        --eval-windows 2 --settings 0.5 --out /tmp/mq                                   # smoke check

Writes DIR/model_quality.md (tables) and DIR/model_quality.json (every number and per-layer report).
The full default run (4 settings x 4 methods, 32 x 512 calibration tokens, 32 evaluation windows of
512) needs roughly an hour on 2 CPU cores; use --settings / --methods to run a part.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from admm_kernels._io import atomic_write_text

METHODS = ("magnitude", "wanda", "sparsegpt", "admm")
LABELS = {"dense": "dense", "magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT",
          "admm": "ADMM-Grad", "admm-accurate": "ADMM accurate", "admm-fast": "ADMM fast", "alps": "ALPS",
          "admm-accurate+tune": "ADMM accurate+tune", "admm-fast+tune": "ADMM fast+tune"}
PROFILES = ("uniform", "owl")
TEXTS = ("shakespeare", "pydoc")
# pydoc topics in sorted order: the first 70 % calibrate, the rest is evaluated (about 330 k and 140 k
# characters: ~75 k and ~32 k SmolLM2 tokens, enough for 32 x 512 calibration and 32 x 512 evaluation)
PYDOC_CALIBRATION_SHARE = 0.7


def label(run: str) -> str:
    """'admm-accurate+owl' -> 'ADMM accurate + OWL'; 'admm-accurate+tune' -> 'ADMM accurate+tune'."""
    spec, plus, profile = run.rpartition("+")
    if not plus or profile not in PROFILES:
        spec, profile = run, ""
    return LABELS.get(spec, spec) + (f" + {profile.upper()}" if profile else "")


def parse_specs(text: str) -> dict:
    """{label: MethodSpec} from --methods: admm-prune bench's method specs, where a preset's name may end in
    "+tune" (admm-accurate+tune: the pipeline's preset "accurate+tune", block tuning included), options
    after it (admm-accurate+tune:tune_lr=1e-3) overriding the preset's."""
    from admm_kernels.bench.methods import MethodSpec, parse_method, split_specs
    from admm_kernels.models.block_tune import TUNED_SUFFIX

    specs = {}
    for item in split_specs(text):
        name, colon, options = item.partition(":")
        tuned = name.endswith(TUNED_SUFFIX)
        spec = parse_method((name[:-len(TUNED_SUFFIX)] if tuned else name) + colon + options)
        if tuned:
            if not spec.options.get("preset"):
                raise ValueError(f"--methods: {item!r}: {TUNED_SUFFIX} follows a preset "
                                 "(admm-accurate+tune)")
            options = {**spec.options, "preset": spec.options["preset"] + TUNED_SUFFIX}
            spec = MethodSpec(item, spec.method, options)
        if item in specs:
            raise ValueError(f"--methods: method given twice: {item}")
        specs[item] = spec
    return specs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="transformers model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--eval-windows", type=int, default=32, help="evaluation windows (default 32)")
    p.add_argument("--settings", default="0.5,0.6,0.7,2:4",
                   help="comma-separated sparsities and N:M patterns (default 0.5,0.6,0.7,2:4)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="method specs of admm-prune bench, separated by commas, or by ';' when a spec has "
                        f"options (default {','.join(METHODS)}; e.g. admm-accurate, admm-fast, alps, "
                        "'admm;admm-accurate:tune_epochs=2,tune_batch=2'; a preset spec may end in +tune: "
                        "admm-accurate+tune); options that are prune_model "
                        "keywords (tune_epochs, sequential, ...) go to the pipeline, the rest to the method")
    p.add_argument("--profiles", default="uniform",
                   help="comma-separated sparsity profiles, each run for every method: uniform, owl (OWL "
                        "runs skip N:M settings, which it does not define) (default uniform)")
    p.add_argument("--upcycle", default=None, metavar="E:K",
                   help="also run every method on the model upcycled to a Mixtral with E experts, top-K "
                        "routing (admm_kernels.models.upcycle: every expert a copy of the block's MLP, a "
                        "random router), same calibration and evaluation: the MoE's perplexity and its time "
                        "per pruned weight next to the dense model's")
    p.add_argument("--text", choices=TEXTS, default="shakespeare",
                   help="calibration and evaluation text: shakespeare (the calibration plays, evaluated on "
                        "the held-out plays; what the presets were tuned on) or pydoc (the Python language "
                        "reference topics shipped with Python, split by topic: technical prose neither the "
                        "presets nor SmolLM2's defaults were tuned on) (default shakespeare)")
    p.add_argument("--no-dense", action="store_true",
                   help="with --upcycle: run the methods on the MoE only (the dense model's perplexity "
                        "is still measured, once)")
    p.add_argument("--max-blocks", type=int, default=None,
                   help="prune only the first N blocks (smoke checks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder for the markdown and JSON files")
    args = p.parse_args(argv)
    try:
        args.specs = parse_specs(args.methods)
    except ValueError as exc:
        p.error(str(exc))
    args.methods = list(args.specs)
    args.profiles = [x.strip() for x in args.profiles.split(",") if x.strip()]
    bad = [x for x in args.profiles if x not in PROFILES]
    if bad:
        p.error(f"--profiles: unknown {bad}; choose from {PROFILES}")
    if args.upcycle is not None:
        try:
            e, k = (int(v) for v in args.upcycle.split(":"))
        except ValueError:
            p.error(f"--upcycle: expected E:K (e.g. 4:2), got {args.upcycle!r}")
        args.upcycle = (e, k)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for s in args.settings:
        if ":" not in s:
            try:
                v = float(s)
            except ValueError:
                p.error(f"--settings: {s!r} is neither a sparsity nor an N:M pattern")
            if not 0 <= v < 1:
                p.error(f"--settings: sparsity {s} is not in [0, 1)")
    for name in ("nsamples", "seqlen", "eval_windows"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def machine() -> dict:
    from admm_kernels.bench.machine import git_commit

    sha = git_commit()["commit"]
    commit = sha[:7] if sha else None
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def text_sources(text: str, folder: Path) -> tuple[str | None, str | None, str]:
    """(calibration source, evaluation source, description) for --text; None = the default Shakespeare
    split of admm_kernels.protocols. pydoc's two parts are written to `folder` (calib/eval .txt)."""
    if text == "shakespeare":
        return None, None, "Shakespeare calibration plays; perplexity on the held-out plays"
    calib, evaluation, cut, count = pydoc_parts()
    paths = []
    for part, text_ in (("calib", calib), ("eval", evaluation)):
        path = folder / f"pydoc-{part}.txt"
        atomic_write_text(path, text_)
        paths.append(str(path))
    return paths[0], paths[1], (f"Python reference topics: the first {cut} of {count} (sorted by name) "
                                "calibrate; perplexity on the others' paragraphs that calibration did not "
                                "hold")


def _paragraph_key(paragraph: str) -> str:
    return " ".join(paragraph.split())


def pydoc_parts() -> tuple[str, str, int, int]:
    """(calibration text, evaluation text, topics calibrating, topics) of the Python reference topics.
    The topics repeat sections of each other (about a quarter of the later topics' long paragraphs occur
    in earlier ones), so the evaluation text keeps only paragraphs that neither the calibration text nor
    an earlier evaluation paragraph holds (compared with whitespace collapsed): no evaluated text was
    calibrated on."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    cut = int(len(names) * PYDOC_CALIBRATION_SHARE)
    calib = "\n\n".join(topics[n] for n in names[:cut])
    seen = {_paragraph_key(p) for p in calib.split("\n\n")}
    kept = []
    for paragraph in (p for n in names[cut:] for p in topics[n].split("\n\n")):
        key = _paragraph_key(paragraph)
        if key and key not in seen:
            seen.add(key)
            kept.append(paragraph)
    return calib, "\n\n".join(kept), cut, len(names)


def setting_kwargs(setting: str) -> dict:
    """'0.6' -> unstructured 60 %; '2:4' -> the N:M pattern."""
    if ":" in setting:
        return {"pattern": setting, "sparsity": 0.5}
    return {"pattern": "unstructured", "sparsity": float(setting)}


def run(args) -> dict:
    from admm_kernels import protocols
    from admm_kernels.eval import evaluate_perplexity
    from admm_kernels.models import find_blocks, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, path = load_model(args.model)
    device = torch.device(args.device)
    calib_source, eval_source, text_note = text_sources(args.text, Path(args.out))
    calib = protocols.calibration_windows(tok, calib_source, nsamples=args.nsamples, seqlen=args.seqlen,
                                          seed=args.seed)
    ev = protocols.evaluation_tokens(tok, eval_source)
    models = [] if args.no_dense and args.upcycle else [("", model)]
    moe_check = None
    if args.upcycle:
        from admm_kernels.models.upcycle import upcycle_to_mixtral

        moe = upcycle_to_mixtral(model, *args.upcycle, seed=args.seed)
        with torch.no_grad():
            x = ev[: args.seqlen][None]
            moe_check = float((moe(x).logits - model(x).logits).abs().max())
        print(f"upcycled to {args.upcycle[0]} experts, top {args.upcycle[1]}: max |logit difference| "
              f"{moe_check:.2e}", flush=True)
        models.append(("moe:", moe))
    results: dict = {}
    if not models or models[0][0] != "":  # --no-dense: the dense model's perplexity only
        results["dense"] = {"perplexity": evaluate_perplexity(model, ev, seqlen=args.seqlen,
                                                              max_windows=args.eval_windows, device=device)}
    for tag, net in models:
        _run_model(args, net, tag, calib, ev, device, results)
    blocks_name, blocks = find_blocks(model)
    n_blocks = len(blocks) if args.max_blocks is None else min(args.max_blocks, len(blocks))
    eval_tokens = min(ev.numel() // args.seqlen, args.eval_windows) * args.seqlen
    return {"model": str(path), "text": args.text, "text_note": text_note, "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "eval_windows": args.eval_windows, "eval_tokens": eval_tokens,
            "blocks_pruned": n_blocks, "blocks": len(blocks), "seed": args.seed,
            "upcycle": args.upcycle, "upcycle_max_logit_difference": moe_check,
            "machine": machine(), "results": results}


def _run_model(args, model, tag: str, calib, ev, device, results: dict) -> None:
    """Every method and setting on `model` (tag "" for the model itself, "moe:" for its upcycled MoE);
    results keyed "<tag><run>@<setting>"."""
    from admm_kernels import prune_model
    from admm_kernels.eval import evaluate_perplexity
    from admm_kernels.models import find_blocks

    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    blocks_name, blocks = find_blocks(model)
    n_blocks = len(blocks) if args.max_blocks is None else min(args.max_blocks, len(blocks))
    prefixes = tuple(f"{blocks_name}.{i}." for i in range(n_blocks))
    # every block: the default selection (MoE routers stay dense); fewer: a name filter
    layers = None if n_blocks == len(blocks) else (lambda name, m: name.startswith(prefixes))

    def ppl() -> float:
        return evaluate_perplexity(model, ev, seqlen=args.seqlen, max_windows=args.eval_windows,
                                   device=device)

    t = time.perf_counter()
    results[f"{tag}dense"] = {"perplexity": ppl(), "eval_seconds": time.perf_counter() - t}
    print(f"{tag}dense: perplexity {results[f'{tag}dense']['perplexity']:.3f}", flush=True)
    for setting in args.settings:
        for profile in args.profiles:
            if profile != "uniform" and ":" in setting:
                continue
            for name in args.methods:
                spec = args.specs[name]
                run_name = tag + name + ("" if profile == "uniform" else f"+{profile}")
                model.load_state_dict(dense_state)
                t = time.perf_counter()
                report = prune_model(model, calib, method=spec.method, device=device, layers=layers,
                                     sparsity_profile=profile, **setting_kwargs(setting), **spec.options)
                wall = time.perf_counter() - t
                value = ppl()
                errors = [r["error"] for r in report["layers"] if r["error"] is not None]
                results[f"{run_name}@{setting}"] = {
                    "method": name, "profile": profile, "setting": setting, "perplexity": value,
                    "wall_seconds": wall, "timings": report["timings"],
                    "achieved_sparsity": report["achieved_sparsity"],
                    "pruned_weights": sum(r["numel"] for r in report["layers"] if r["error"] is not None),
                    "coverage": report["coverage"]["share"],
                    "mean_layer_error": sum(errors) / len(errors), "layers": report["layers"],
                    "block_tune": report.get("block_tune"),  # per block: loss before/after (and held out)
                }
                tm = report["timings"]
                print(f"{run_name:>18} @ {setting:<4}: perplexity {value:9.3f}  time {wall:7.1f} s "
                      f"(forward {tm['forward']:.1f}, gram {tm['gram']:.1f}, solve {tm['solve']:.1f})",
                      flush=True)
    model.load_state_dict(dense_state)


def markdown(res: dict, methods: list[str], settings: list[str], profiles: list[str] = ("uniform",)) -> str:
    r = res["results"]
    runs = [m + ("" if p == "uniform" else f"+{p}") for p in profiles for m in methods]
    m = res["machine"]
    lines = [
        "# Whole-model quality and speed",
        "",
        f"Model `{Path(res['model']).name}`, {res['blocks_pruned']}/{res['blocks']} blocks pruned; "
        f"calibration {res['nsamples']} x {res['seqlen']} tokens, seed {res['seed']} ("
        f"{res.get('text_note', 'Shakespeare')}); perplexity on {res['eval_tokens']} held-out tokens "
        f"(windows of {res['seqlen']}). "
        f"{m['date']}, commit {m['commit']}, {m['cores']} cores ({m['cpu']}), torch {m['torch']} with "
        f"{m['torch_threads']} threads{', GPU ' + m['cuda'] if m['cuda'] else ''}.",
        "",
        "## Perplexity (lower is better)",
        "",
        "| method | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
        "| dense | " + " | ".join(f"{r['dense']['perplexity']:.2f}" for _ in settings) + " |",
    ]
    def cell(run: str, s: str, key: str, fmt: str) -> str:
        e = r.get(f"{run}@{s}")
        return "-" if e is None else format(e[key], fmt)

    for run in runs:
        lines.append(f"| {label(run)} | " + " | ".join(cell(run, s, "perplexity", ".2f") for s in settings)
                     + " |")
    if "admm" in methods and len(runs) > 1:
        lines += ["", "Perplexity / ADMM-Grad's (uniform) at the same setting:", "",
                  "| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
        for run in runs:
            if run == "admm":
                continue
            ratios = [f"{r[f'{run}@{s}']['perplexity'] / r[f'admm@{s}']['perplexity']:.3f}"
                      if f"{run}@{s}" in r else "-" for s in settings]
            lines.append(f"| {label(run)} | " + " | ".join(ratios) + " |")
    if {"admm", "sparsegpt", "wanda"} <= set(methods) and all(f"admm@{s}" in r for s in settings):
        def beats(s: str) -> str:
            best_baseline = min(r[f"sparsegpt@{s}"]["perplexity"], r[f"wanda@{s}"]["perplexity"])
            return "yes" if r[f"admm@{s}"]["perplexity"] < best_baseline else "NO"
        lines += ["", "ADMM-Grad better than SparseGPT and Wanda: "
                  + ", ".join(f"{s}: {beats(s)}" for s in settings)]
    # wall time relative to SparseGPT's when it ran, else to ADMM-Grad's (uniform), same setting
    base = "sparsegpt" if "sparsegpt" in runs else "admm"
    lines += ["", "## End-to-end time (seconds) and breakdown", "",
              f"| method | setting | total | capture | forward | Gram | solve | time / {label(base)} |",
              "|---|---|---|---|---|---|---|---|"]
    for s in settings:
        for run in runs:
            e = r.get(f"{run}@{s}")
            if e is None:
                continue
            t = e["timings"]
            ratio = ""
            if run != base and f"{base}@{s}" in r:
                ratio = f"{e['wall_seconds'] / r[f'{base}@{s}']['wall_seconds']:.2f}x"
            lines.append(f"| {label(run)} | {s} | {e['wall_seconds']:.1f} | {t['capture']:.1f} | "
                         f"{t['forward']:.1f} | {t['gram']:.1f} | {t['solve']:.1f} | {ratio} |")
    if res.get("upcycle"):
        e, k = res["upcycle"]
        lines += ["", f"## The upcycled MoE ({e} experts, top {k}; max |logit difference| to the dense model "
                  f"{res['upcycle_max_logit_difference']:.1e})", "",
                  "Perplexity of the dense model / of its MoE pruned the same way, the MoE's coverage of its "
                  "block weights, and the MoE's end-to-end time per pruned weight over the dense model's:",
                  "",
                  "| method | setting | dense | MoE | MoE / dense | MoE coverage | "
                  "time per weight, MoE / dense |",
                  "|---|---|---|---|---|---|---|",
                  f"| unpruned | - | {r['dense']['perplexity']:.2f} | {r['moe:dense']['perplexity']:.2f} | "
                  f"{r['moe:dense']['perplexity'] / r['dense']['perplexity']:.3f} | - | - |"]
        for s in settings:
            for run in runs:
                a, b = r.get(f"{run}@{s}"), r.get(f"moe:{run}@{s}")
                if a is None or b is None:
                    continue
                per = (b["wall_seconds"] / b["pruned_weights"]) / (a["wall_seconds"] / a["pruned_weights"])
                lines.append(f"| {label(run)} | {s} | {a['perplexity']:.2f} | {b['perplexity']:.2f} | "
                             f"{b['perplexity'] / a['perplexity']:.3f} | {b['coverage']:.3f} | {per:.2f}x |")
    lines += ["", "Mean relative layer error tr(dW G dW^T)/tr(W G W^T):", "",
              "| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for run in runs:
        lines.append(f"| {label(run)} | " + " | ".join(cell(run, s, "mean_layer_error", ".4f")
                                                       for s in settings) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run(args)
    atomic_write_text(out / "model_quality.json", json.dumps(res, indent=1, default=str) + "\n")
    md = markdown(res, args.methods, args.settings, args.profiles)
    atomic_write_text(out / "model_quality.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
