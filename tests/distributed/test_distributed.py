"""Distributed pipeline: 2 and 3 gloo ranks on the CPU, launched by torchrun or as plain
processes with torchrun's environment (so a test can kill or stall one rank). Every launch is bounded by
a subprocess timeout, so a hang fails the test instead of stalling CI.

Tolerance against one process (the Gram sums run in another order; stated in
admm_kernels.models.distributed and the README): per layer, relative reconstruction error equal to
1e-5 relative, relative weight difference ||W_dist - W_one|| / ||W_one|| <= 1e-4, masks equal except
for at most 0.1 % of the entries (near-ties), perplexity equal to 1e-4 relative. Perplexity of the same
model is the very same float whatever the number of ranks (per-window losses summed in window order).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import dist_worker  # noqa: E402
from tiny_models import save_tiny_folder  # noqa: E402

from admm_kernels.models import distributed as dist_mod  # noqa: E402
from admm_kernels.models.loading import load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
WORKER = str(Path(__file__).resolve().parents[1] / "dist_worker.py")
LAUNCH_TIMEOUT = 300  # seconds per launched run: imports of 2-3 processes on 2 busy cores take ~20 s
ERROR_RTOL, WEIGHT_RTOL, MASK_FRACTION, PPL_RTOL = 1e-5, 1e-4, 1e-3, 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    env.pop("ADMM_KERNELS_BACKEND", None)
    return env


def _torchrun(n: int, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), WORKER, *args]
    res = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _ranks(n: int, *args, env: dict | None = None) -> list[subprocess.Popen]:
    """n processes with torchrun's variables (no torchrun agent: nothing kills the survivors for us)."""
    port = _free_port()
    def env_of(r: int) -> dict:
        return _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port), **(env or {}))
    return [subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env_of(r)) for r in range(n)]


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """(return code, stderr) of every process; kills them all if they do not end within `timeout`."""
    deadline = time.monotonic() + timeout
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _compare(one: dict, dist: dict, what: str) -> None:
    """Assert the stated tolerance between a single-process and a distributed result."""
    for a, b in zip(one["report"]["layers"], dist["report"]["layers"]):
        assert a["name"] == b["name"]
        assert b["error"] == pytest.approx(a["error"], rel=ERROR_RTOL), (what, a["name"])
    for k, w in one["weights"].items():
        v = dist["weights"][k]
        if w.dim() >= 2:  # linears, and fused experts (E, out, in)
            assert float((v - w).norm() / w.norm()) <= WEIGHT_RTOL, (what, k)
            assert int(((v == 0) != (w == 0)).sum()) <= MASK_FRACTION * w.numel(), (what, k)
        else:
            assert torch.equal(v, w), (what, k)  # norms, embeddings: never pruned
    assert dist["perplexity"] == pytest.approx(one["perplexity"], rel=PPL_RTOL), what


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_api_matches_one_process(tmp_path, world):
    """Three architectures (LLaMA: q/k/v, gate/up groups, rotary; OPT: biases, fc1/fc2, learned positions;
    Qwen3-MoE: fused experts, per-expert Grams and token counts summed over the ranks), with and without
    sequential mode: every rank holds the same pruned model, equal to one process's within the
    tolerance; the report says who did what."""
    archs = ("llama", "opt", "qwen3_moe")
    _torchrun(world, "api", str(tmp_path / "res"), ",".join(archs))
    results = [torch.load(tmp_path / f"res.{r}.pt", weights_only=False) for r in range(world)]
    for arch in archs:
        for sequential in (False, True):
            key = f"{arch}-{sequential}"
            one = dist_worker.prune_tiny(arch, sequential, distributed=False)
            ref = results[0][key]
            for r in range(1, world):  # identical on every rank, bit for bit
                other = results[r][key]["weights"]
                assert all(torch.equal(ref["weights"][k], other[k]) for k in ref["weights"])
                assert results[r][key]["report"]["layers"] == ref["report"]["layers"]
                assert results[r][key]["perplexity"] == ref["perplexity"]
            _compare(one, ref, key)
            # The dense model's perplexity: per-window losses summed in window order, the same float.
            assert ref["dense_perplexity"] == one["dense_perplexity"]
            rep = ref["report"]
            assert rep["world_size"] == world and len(rep["ranks"]) == world
            shares = [dist_mod.shard(5, world, r) for r in range(world)]
            assert [r["windows"] for r in rep["ranks"]] == [[s.start, s.stop] for s in shares]
            keys = {"forward", "gram", "solve", "comm", "total"}
            assert all(set(r["timings"]) >= keys for r in rep["ranks"])
            if not sequential:  # 7 layers per block (or 4 + 12 experts) spread over the ranks
                assert {entry["rank"] for entry in rep["layers"]} == set(range(world))
                experts = [e for e in rep["layers"] if "tokens" in e]
                assert (arch == "qwen3_moe") == bool(experts)
                assert {e["rank"] for e in experts} == (set(range(world)) if experts else set())
            else:
                assert all("stage" in entry for entry in rep["layers"])
    # OWL's dense pre-pass runs on rank 0 with every window: the very block sparsities of one process.
    one = dist_worker.prune_tiny("llama", False, distributed=False, sparsity_profile="owl")
    for r in range(world):
        assert results[r]["llama-owl"]["report"]["sparsity_profile"] == one["report"]["sparsity_profile"]
    assert len(set(one["report"]["sparsity_profile"]["block_sparsity"])) > 1
    _compare(one, results[0]["llama-owl"], "llama-owl")


# --- the CLI under torchrun: one reference run shared by the tests below ------------------------------

CLI_ARGS = ["--nsamples", "5", "--seqlen", "16", "--threads", "1", "-o", "iters=4", "-o", "T=3", "--quiet"]


def _cli_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["cli", "prune", str(root / "tiny-llama"), "--calib", str(root / "calib.txt"), "--eval-text",
            str(root / "eval.txt"), *CLI_ARGS, "--out", str(out), *extra]


def _tensors(folder: Path) -> dict:
    model, _, _ = load_model(folder, with_tokenizer=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    """A 2-rank torchrun run of `admm-prune prune` (with a log of who wrote what) and a 1-process run of the
    same command."""
    torch.manual_seed(0)
    root = save_tiny_folder(tmp_path_factory.mktemp("dist-cli"), 400, 1, 200, 2)
    writes = root / "writes.log"
    _torchrun(2, *_cli_args(root, root / "out2"), env=_env(DIST_TEST_WRITES=str(writes)))
    res = subprocess.run([sys.executable, WORKER, *_cli_args(root, root / "out1")], env=_env(),
                         capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    return root, writes


def test_cli_distributed_writes_once_and_matches_one_process(cli_reference):
    root, writes = cli_reference
    lines = writes.read_text().split()
    pairs = list(zip(lines[::2], lines[1::2]))
    assert {rank for rank, _ in pairs} == {"0"}, pairs  # rank 1 never writes
    assert [w for _, w in pairs].count("output") == 1 and [w for _, w in pairs].count("state") == 3
    assert not (root / "out2.state").exists()  # the state is removed after the final save
    report = json.loads((root / "out2" / "prune_report.json").read_text())
    assert report["world_size"] == 2 and [r["rank"] for r in report["ranks"]] == [0, 1]
    one_report = json.loads((root / "out1" / "prune_report.json").read_text())
    one = {"report": one_report, "weights": _tensors(root / "out1"),
           "perplexity": one_report["perplexity"]["after"]}
    dist = {"report": report, "weights": _tensors(root / "out2"), "perplexity": report["perplexity"]["after"]}
    _compare(one, dist, "cli")
    assert report["perplexity"]["before"] == one_report["perplexity"]["before"]  # the same float


def test_streamed_ranks_hold_one_block_at_a_time(tmp_path):
    """Under torchrun every rank streams: the live tensor bytes when each block arrives stay at those of
    block 0's arrival on every rank (rank 0 also saves the state), as in one process."""
    from tiny_models import tiny_model

    root = save_tiny_folder(tmp_path, 400, 1, 200, 2)
    block = sum(p.numel() * p.element_size() for p in tiny_model("llama").model.layers[0].parameters())
    log = tmp_path / "live.log"
    _torchrun(2, *_cli_args(root, tmp_path / "out", "--stream", "--no-eval", "--nsamples", "2"),
              env=_env(DIST_TEST_LIVE_BYTES=str(log)))
    samples: dict[str, list[int]] = {}
    for line in log.read_text().splitlines():
        rank, size = line.split()
        samples.setdefault(rank, []).append(int(size))
    assert sorted(samples) == ["0", "1"] and all(len(v) == 3 for v in samples.values()), samples
    for rank, sizes in samples.items():
        assert max(sizes) - sizes[0] < 0.5 * block, (rank, sizes, block)


def test_killed_rank_stops_the_others_and_resume_matches(cli_reference):
    """Rank 1 is SIGKILLed when it reaches block 1: rank 0 stops at its next collective with one clear
    line, leaves no output folder (nor a temporary one), keeps the state of block 0; `--resume` (here
    also streamed: the state does not depend on it) finishes with the uninterrupted run's exact result."""
    root, _ = cli_reference
    out = root / "killed"
    procs = _ranks(2, *_cli_args(root, out), env={"DIST_TEST_FAULT": "1:1:kill"})
    (rc0, err0), (rc1, _) = _wait(procs, LAUNCH_TIMEOUT)
    assert rc1 == -signal.SIGKILL
    assert rc0 == 3, err0
    assert "rank 0 of 2: block 1" in err0 and "another rank died or did not answer" in err0, err0
    assert "--resume to continue from the last block every rank finished" in err0
    assert not out.exists() and not list(root.glob(".killed.tmp-*"))
    state = json.loads((root / "killed.state" / "state.json").read_text())
    assert state["next_block"] == 1

    procs = _ranks(2, *_cli_args(root, out, "--resume", "--stream"))
    (rc0, err0), (rc1, err1) = _wait(procs, LAUNCH_TIMEOUT)
    assert rc0 == 0 and rc1 == 0, err0[-2000:] + err1[-2000:]
    report = json.loads((out / "prune_report.json").read_text())
    assert report["resumed_from_block"] == 1 and report["streamed"] is True
    reference = json.loads((root / "out2" / "prune_report.json").read_text())
    assert report["perplexity"] == reference["perplexity"]
    mine, ref = _tensors(out), _tensors(root / "out2")
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)


def test_hung_rank_times_out_with_a_clear_message(cli_reference):
    root, _ = cli_reference
    out = root / "hung"
    procs = _ranks(2, *_cli_args(root, out, "--dist-timeout", "5"), env={"DIST_TEST_FAULT": "1:2:hang"})
    try:
        rc0, err0 = _wait(procs[:1], LAUNCH_TIMEOUT)[0]
    finally:
        procs[1].kill()
        procs[1].wait()
    assert rc0 == 3, err0
    assert "rank 0 of 2: block 2" in err0 and "within the 5 s timeout (--dist-timeout)" in err0, err0
    assert err0.rstrip().endswith("rerun the same command (same number of ranks) with --resume to continue "
                                  "from the last block every rank finished"), err0
    assert not out.exists() and not list(root.glob(".hung.tmp-*"))
    assert json.loads((root / "hung.state" / "state.json").read_text())["next_block"] == 2
    # Another number of ranks is refused (the Gram sums would run in another order), saying how many.
    res = subprocess.run([sys.executable, WORKER, *_cli_args(root, out, "--resume")], env=_env(),
                         capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "world_size: saved 2, now None" in res.stderr and "resume with 2 rank(s) (torchrun " \
        "--nproc-per-node 2)" in res.stderr, res.stderr[-2000:]


def test_rank_zero_refusal_reaches_every_rank(cli_reference, tmp_path):
    """A non-empty --out is refused on rank 0 before any work; rank 1 stops at once quoting it."""
    root, _ = cli_reference
    out = tmp_path / "full"
    out.mkdir()
    (out / "x").write_text("keep me")
    procs = _ranks(2, *_cli_args(root, out))
    (rc0, err0), (rc1, err1) = _wait(procs, LAUNCH_TIMEOUT)
    assert rc0 == 2 and "is not empty; pass --overwrite" in err0, err0
    assert rc1 == 3 and "stopping because rank 0 failed (checking --out)" in err1, err1
    assert (out / "x").read_text() == "keep me"


# --- helpers that need no processes -------------------------------------------------------------------

def test_shards_and_cost_balance():
    assert [list(dist_mod.shard(5, 3, r)) for r in range(3)] == [[0, 1], [2, 3], [4]]
    assert dist_mod.shard_counts(7, 2) == [4, 3]
    # LLaMA-7B's block: q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008 (cost out*in^2)
    costs = [4096 * 4096 ** 2] * 4 + [11008 * 4096 ** 2] * 2 + [4096 * 11008 ** 2]
    owners = dist_mod.assign_by_cost(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert owners[6] == 0 and max(loads) / min(loads) < 1.5  # down alone outweighs the rest
    assert dist_mod.assign_by_cost(costs, 8)[:7] == dist_mod.assign_by_cost(costs, 8)[:7]
    assert sorted(dist_mod.assign_by_cost([1.0] * 3, 3)) == [0, 1, 2]


def test_backend_choice_and_bad_values():
    cpu = torch.device("cpu")
    assert dist_mod.backend_for(cpu) == "gloo"
    assert dist_mod.backend_for(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert dist_mod.backend_for(torch.device("cuda", 0), "gloo") == "gloo"
    with pytest.raises(ValueError, match="'nccl' needs CUDA devices"):
        dist_mod.backend_for(cpu, "nccl")
    with pytest.raises(ValueError, match="must be one of auto, gloo, nccl, got 'mpi'"):
        dist_mod.backend_for(cpu, "mpi")
    with pytest.raises(ValueError, match="positive number of seconds, got 0"):
        dist_mod.init_from_environment(cpu, timeout_s=0)
    with pytest.raises(ValueError, match="distributed=True needs an initialised"):
        dist_mod.resolve_comm(True)
    with pytest.raises(TypeError, match="distributed must be None, a bool or a Comm"):
        dist_mod.resolve_comm("yes")
    assert dist_mod.resolve_comm(None) is dist_mod.LOCAL


def test_more_ranks_than_windows_is_refused():
    from tiny_models import tiny_model, tiny_tokens

    import admm_kernels as ak

    with pytest.raises(ValueError, match="calibration has 2 windows, fewer than the 3 ranks"):
        ak.prune_model(tiny_model("llama"), tiny_tokens(2, 16), distributed=dist_mod.Comm(0, 3))


def test_cli_refuses_bad_distributed_options(capsys):
    from admm_kernels.cli import main

    with pytest.raises(SystemExit):
        main(["prune", "--dist-timeout", "-1"])
    assert "--dist-timeout must be a positive number of seconds, got '-1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "--dist-backend", "mpi"])
    assert "invalid choice: 'mpi'" in capsys.readouterr().err
