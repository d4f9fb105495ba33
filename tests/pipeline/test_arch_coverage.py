"""Every decoder-only causal-LM architecture of the installed transformers, as a tiny model from a generic
shrink of its default config (tests/arch_sweep.py), is pruned with magnitude at 50 %, its per-layer
sparsity verified in the saved weights and its logits checked finite (benchmarks/arch_coverage.py). No
architecture may end "partial" (pruned, but a sparsity that was not reached), and the share pruned with
verified sparsity may not fall below what this checkout reaches; the table is written for RESULTS.md.
About 30 s on one thread."""

import os
import signal
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

# What this checkout reaches with transformers 5.24 (RESULTS.md, "Architecture coverage"); a change
# that loses an architecture fails here.
MIN_VERIFIED_SHARE = 0.977
# Families that must prune with verified sparsity: the classic ones SparseGPT and Wanda report on, the
# MoE layouts, the hybrid layer lists and the other mechanisms below.
MUST = ("llama", "opt", "bloom", "falcon", "gpt_neo", "mpt", "gpt2", "gpt_neox", "mixtral", "qwen3_moe",
        "qwen2_moe", "olmoe", "gpt_oss", "deepseek_v3", "glm4_moe", "granitemoe", "ernie4_5_moe",
        "llama4_text", "jamba", "bamba", "granitemoehybrid", "falcon_h1", "zamba2", "qwen3_next", "lfm2",
        "nemotron_h", "dbrx", "mllama", "rwkv", "big_bird", "xmod",
        # matrices the blocks multiply by themselves (admm_kernels.models.plain_params), sequence- and
        # stream-first hidden states, zero-computation experts
        "jetmoe", "xlnet", "zamba", "deepseek_v4", "inkling2_text", "inkling2_loop_text", "inkling_text",
        "gemma3n_text", "longcat_flash")


def test_every_architecture_prunes_with_verified_sparsity_or_refuses(tmp_path):
    import arch_coverage
    from arch_sweep import causal_lm_architectures

    signal.signal(signal.SIGALRM, arch_coverage._on_alarm)
    rows = [arch_coverage.sweep_one(arch, 60) for arch in causal_lm_architectures()]
    table = arch_coverage.markdown(rows, 0.0)
    (tmp_path / "coverage.md").write_text(table)
    if os.environ.get("ADMM_KERNELS_COVERAGE_TABLE"):
        Path(os.environ["ADMM_KERNELS_COVERAGE_TABLE"]).write_text(table)
    by = {r["arch"]: r for r in rows}
    assert not [r["arch"] for r in rows if r["status"] == "partial"]
    missing = [a for a in MUST if a in by and by[a]["status"] != "pruned-verified"]
    assert not missing, {a: by[a]["note"] for a in missing}
    built = [r for r in rows if r["status"] != "build-failed"]
    verified = [r for r in built if r["status"] == "pruned-verified"]
    assert len(verified) / len(built) >= MIN_VERIFIED_SHARE, arch_coverage.summary(rows, 0.0)
