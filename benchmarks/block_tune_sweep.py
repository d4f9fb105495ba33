"""Block tuning: held-out loss per epoch, and what early stopping would keep, on the first blocks of the
embedded SmolLM2-135M.

For each setting BATCH:EPOCHS, a fresh model is pruned (70 % unstructured, preset "accurate" unless
--preset says otherwise) in its first --blocks blocks only, with block tuning of EPOCHS epochs in
batches of BATCH windows and early stopping's held-out split (1 window in --holdout) but a patience of
EPOCHS, so every epoch runs and the held-out loss of every epoch is reported. From that curve the table
gives, per block, the held-out loss before tuning and after each number of epochs, and for patience 1, 2
and 3 the epoch early stopping would stop at and the held-out loss of the weights it keeps (the best
epoch's).

    PYTHONPATH=. python benchmarks/block_tune_sweep.py --threads 1 --out /tmp/tune           # 4:16,2:8
    PYTHONPATH=. python benchmarks/block_tune_sweep.py --blocks 1 --nsamples 4 --seqlen 32 \
        --settings 2:2 --out /tmp/t                                                          # smoke check

Writes DIR/block_tune_sweep.json after every setting and DIR/block_tune_sweep.md at the end.
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

PATIENCES = (1, 2, 3)


def stop_of(heldout: list[float], patience: int) -> tuple[int, int]:
    """(epoch early stopping with `patience` stops after, best epoch it keeps) on a held-out curve
    (heldout[0]: before tuning), by the rule of admm_kernels.models.block_tune._EarlyStop."""
    best = 0
    for epoch in range(1, len(heldout)):
        if heldout[epoch] < heldout[best]:
            best = epoch
        if epoch - best >= patience:
            return epoch, best
    return len(heldout) - 1, best


def run_setting(batch: int, epochs: int, args) -> dict:
    import admm_kernels as ak
    from admm_kernels.models import load_model
    from admm_kernels.protocols import calibration_windows

    model, tokenizer, _ = load_model(None)
    ids = calibration_windows(tokenizer, None, nsamples=args.nsamples, seqlen=args.seqlen)
    first = {f"model.layers.{b}." for b in range(args.blocks)}
    options = {"preset": args.preset} if args.preset else {}
    t = time.perf_counter()
    report = ak.prune_model(model, ids, sparsity=args.sparsity, layers=lambda name, _m: any(
        name.startswith(p) for p in first), tune_epochs=epochs, tune_lr=args.lr, tune_batch=batch,
        tune_patience=epochs, tune_holdout=args.holdout, **options)
    return {"batch": batch, "epochs": epochs, "seconds": time.perf_counter() - t,
            "timings": report["timings"], "blocks": report["block_tune"]["blocks"]}


def table(results: list[dict]) -> str:
    lines = []
    for res in results:
        epochs, tuned = res["epochs"], res["blocks"]
        shown = sorted({e for e in (1, 2, 4, 8, 12, 16) if e <= epochs} | {epochs})
        per_epoch = res["timings"]["tune"] / (len(tuned) * epochs)
        lines += [f"batch {res['batch']}, {epochs} epochs: tuning {res['timings']['tune']:.0f} s of "
                  f"{res['seconds']:.0f} s ({per_epoch:.1f} s per block-epoch, held-out evaluations "
                  "included)", "",
                  "| block | all windows before -> after | held-out before | " +
                  " | ".join(f"ep {e}" for e in shown) + " | " +
                  " | ".join(f"patience {p}: stop / best / held-out" for p in PATIENCES) + " |",
                  "|" + "---|" * (3 + len(shown) + len(PATIENCES))]
        for r in tuned:
            h = r["heldout"]
            cells = [f"{r['block']}", f"{r['loss_before']:.4g} -> {r['loss_after']:.4g}", f"{h[0]:.4g}"]
            cells += [f"{h[e] / h[0]:.3f}x" for e in shown]
            for p in PATIENCES:
                stop, best = stop_of(h, p)
                cells.append(f"{stop} / {best} / {h[best] / h[0]:.3f}x")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="4:16,2:8", help="BATCH:EPOCHS,... (default 4:16,2:8)")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--preset", default="accurate", help="ADMM preset ('' for the seed recipe)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--holdout", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for setting in args.settings.split(","):
        batch, epochs = (int(v) for v in setting.split(":"))
        results.append(run_setting(batch, epochs, args))
        settings = {k: str(v) for k, v in vars(args).items()}
        atomic_write_text(args.out / "block_tune_sweep.json",
                          json.dumps({"machine": machine(), "args": settings, "results": results}, indent=1))
        print(f"done {setting}: {results[-1]['seconds']:.0f} s", flush=True)
    atomic_write_text(args.out / "block_tune_sweep.md", table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
