"""Block tuning under torch.distributed: 2 gloo ranks on the CPU (torchrun, bounded by the launch timeout
of tests/test_distributed.py) against one process.

The step schedule is global (the windows numbered in rank order, one permutation per epoch), each rank
back-propagates the share of a step's mean loss that its windows make, and the gradients are summed over
the ranks: every rank applies the Adam step one process would, so the results agree up to the order of
the float32 sums (tolerance below), and the ranks hold the very same weights.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import dist_worker  # noqa: E402
from test_distributed import _torchrun  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# On this CPU the two runs came out bit-identical (the sums of two ranks' shares happened to round the
# same); what is promised is float32 agreement, whatever the BLAS.
WEIGHT_RTOL, LOSS_RTOL = 1e-5, 1e-4
ARCHS = ("llama", "qwen3_moe")  # plain linears; fused experts (a gradient mask over unselected entries)


def test_two_ranks_tune_like_one_process(tmp_path):
    _torchrun(2, "tune", str(tmp_path / "res"), ",".join(ARCHS))
    results = [torch.load(tmp_path / f"res.{r}.pt", weights_only=False) for r in range(2)]
    for arch in ARCHS:
        for settings in dist_worker.TUNE_SETTINGS:
            key = f"{arch}-{settings}"
            ref, other = results[0][key], results[1][key]
            assert all(torch.equal(ref["weights"][k], other["weights"][k]) for k in ref["weights"]), key
            assert ref["report"]["block_tune"] == other["report"]["block_tune"], key
            one = dist_worker.tune_tiny(arch, settings, distributed=False)
            tuned_one, tuned = one["report"]["block_tune"], ref["report"]["block_tune"]
            assert {k: v for k, v in tuned.items() if k != "blocks"} == \
                {k: v for k, v in tuned_one.items() if k != "blocks"}
            for a, b in zip(tuned_one["blocks"], tuned["blocks"]):
                assert b["loss_after"] < b["loss_before"], key
                for name in ("loss_before", "loss_after"):
                    assert b[name] == pytest.approx(a[name], rel=LOSS_RTOL), (key, name)
                if settings == "early":
                    assert (b["epochs"], b["best_epoch"]) == (a["epochs"], a["best_epoch"]), key
                    assert b["heldout"] == pytest.approx(a["heldout"], rel=LOSS_RTOL), key
            for k, w in one["weights"].items():
                v = ref["weights"][k]
                assert torch.equal(v == 0, w == 0), (key, k)  # tuning keeps magnitude's masks exactly
                if w.dim() >= 2:
                    assert float((v - w).norm() / w.norm()) <= WEIGHT_RTOL, (key, k)
                else:
                    assert torch.equal(v, w), (key, k)
