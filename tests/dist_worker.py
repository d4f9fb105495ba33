"""One rank of a distributed test run (started by tests/distributed/test_distributed.py through torchrun,
or as plain processes with torchrun's environment variables so a test can kill one of them).

    python dist_worker.py cli ARGS...        admm_kernels.cli.main(ARGS)
    python dist_worker.py api RESULT ARCHS   prune tiny models of ARCHS (comma-separated) with and without
                                             sequential mode; torch.save the weights, reports and
                                             perplexities to RESULT.RANK.pt
    python dist_worker.py tune RESULT ARCHS  prune and block-tune tiny models of ARCHS (tune_tiny), with
                                             and without early stopping; torch.save to RESULT.RANK.pt

Environment: DIST_TEST_FAULT="RANK:BLOCK:kill|hang" makes that rank SIGKILL itself (or sleep for an hour)
when it reaches that block; DIST_TEST_WRITES=FILE appends "RANK WHAT" for every state save, state extra
and output save, so a test can check that only rank 0 writes; DIST_TEST_LIVE_BYTES=FILE appends
"RANK BYTES" (live CPU tensor bytes) whenever a streamed block is loaded.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def _install_fault() -> None:
    spec = os.environ.get("DIST_TEST_FAULT")
    if not spec:
        return
    rank, block, action = spec.split(":")
    if int(rank) != RANK:
        return
    from admm_kernels.models import pipeline

    real = pipeline._prune_block

    def faulty(block_module, index, *args, **kwargs):
        if index == int(block):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        return real(block_module, index, *args, **kwargs)

    pipeline._prune_block = faulty


def _install_write_log() -> None:
    log = os.environ.get("DIST_TEST_WRITES")
    if not log:
        return
    from admm_kernels import output
    from admm_kernels.models import state

    def logged(what, fn):
        def wrapper(*args, **kwargs):
            with open(log, "a") as fh:
                fh.write(f"{RANK} {what}\n")
            return fn(*args, **kwargs)
        return wrapper

    state.PipelineState.save = logged("state", state.PipelineState.save)
    state.PipelineState.write_extra = logged("extra", state.PipelineState.write_extra)
    output.save = logged("output", output.save)


def _install_live_bytes_log() -> None:
    """DIST_TEST_LIVE_BYTES=FILE: append "RANK BYTES" (the live CPU tensor bytes) whenever a streamed
    block is loaded."""
    log = os.environ.get("DIST_TEST_LIVE_BYTES")
    if not log:
        return
    import gc

    from tiny_models import live_cpu_tensor_bytes

    from admm_kernels.models.streaming import StreamedModel

    real = StreamedModel.load_block

    def load_and_log(self, b):
        real(self, b)
        gc.collect()
        with open(log, "a") as fh:
            fh.write(f"{RANK} {live_cpu_tensor_bytes()}\n")
    StreamedModel.load_block = load_and_log


def prune_tiny(arch: str, sequential: bool, distributed=None, **profile) -> dict:
    """The API run the distributed tests compare: a tiny model of `arch` evaluated, pruned on 5 windows (so
    2 and 3 ranks get unequal shares) and evaluated again (7 windows: unequal shares too). Returns the
    weights, report and both perplexities."""
    from tiny_models import tiny_model, tiny_tokens

    import admm_kernels as ak

    model = tiny_model(arch)
    eval_ids = tiny_tokens(1, 112, seed=5)[0]
    dense_ppl = ak.evaluate_perplexity(model, eval_ids, seqlen=16, distributed=distributed)
    report = ak.prune_model(model, tiny_tokens(5, 16), sparsity=0.6, iters=4, T=3, sequential=sequential,
                            distributed=distributed, **profile)
    ppl = ak.evaluate_perplexity(model, eval_ids, seqlen=16, distributed=distributed)
    return {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "report": report,
            "perplexity": ppl, "dense_perplexity": dense_ppl}


def _api(result: str, archs: str) -> None:
    from admm_kernels.models import distributed

    comm = distributed.init_from_environment(torch.device("cpu"), timeout_s=60)
    out = {f"{arch}-{seq}": prune_tiny(arch, seq) for arch in archs.split(",") for seq in (False, True)}
    out["llama-owl"] = prune_tiny("llama", False, sparsity_profile="owl")
    torch.save(out, f"{result}.{comm.rank}.pt")
    distributed.shutdown()


TUNE_SETTINGS = {"fixed": dict(tune_epochs=3, tune_lr=1e-3, tune_batch=2),
                 "early": dict(tune_epochs=6, tune_lr=1e-3, tune_batch=2, tune_patience=1, tune_holdout=3)}


def tune_tiny(arch: str, settings: str, distributed=None) -> dict:
    """A tiny model of `arch` pruned by magnitude (masks that do not depend on the Gram sums, so any
    difference from one process is block tuning's own) on 5 windows (2 and 3 ranks: unequal shares),
    block-tuned with TUNE_SETTINGS[settings]. Returns the weights and the report."""
    from tiny_models import tiny_model, tiny_tokens

    import admm_kernels as ak

    model = tiny_model(arch)
    report = ak.prune_model(model, tiny_tokens(5, 16), sparsity=0.6, method="magnitude",
                            distributed=distributed, **TUNE_SETTINGS[settings])
    return {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "report": report}


def _tune(result: str, archs: str) -> None:
    from admm_kernels.models import distributed

    comm = distributed.init_from_environment(torch.device("cpu"), timeout_s=60)
    out = {f"{arch}-{s}": tune_tiny(arch, s) for arch in archs.split(",") for s in TUNE_SETTINGS}
    torch.save(out, f"{result}.{comm.rank}.pt")
    distributed.shutdown()


def main() -> int:
    torch.set_num_threads(1)
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "api":
        _api(*args)
        return 0
    if mode == "tune":
        _tune(*args)
        return 0
    _install_fault()
    _install_write_log()
    _install_live_bytes_log()
    from admm_kernels.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
