"""The presets' protocol (benchmarks/preset_protocol.py): its materials must keep calibration and
evaluation text apart, or an over-fitting preset would look better than it is."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import model_quality  # noqa: E402
import preset_protocol  # noqa: E402


def _paragraphs(text: str) -> set[str]:
    return {" ".join(p.split()) for p in text.split("\n\n")} - {""}


def test_pydoc_evaluation_holds_no_paragraph_of_its_calibration(tmp_path):
    """The Python reference topics repeat each other's sections: a split by topic alone evaluated on
    text it calibrated on (about a quarter of the later topics' long paragraphs)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    cut = int(len(names) * model_quality.PYDOC_CALIBRATION_SHARE)
    by_topic = _paragraphs("\n\n".join(topics[n] for n in names[cut:]))
    assert by_topic & _paragraphs("\n\n".join(topics[n] for n in names[:cut]))  # the leak being guarded

    calib_path, eval_path, note = model_quality.text_sources("pydoc", tmp_path)
    calib, evaluation = Path(calib_path).read_text(), Path(eval_path).read_text()
    assert not _paragraphs(calib) & _paragraphs(evaluation)
    assert len(evaluation) > 100_000 and len(calib) > 200_000  # 32 x 512 tokens each, with room
    assert "others' paragraphs" in note


def test_shakespeare_material_uses_the_disjoint_plays():
    assert model_quality.text_sources("shakespeare", Path("/nonexistent")) == (
        None, None, "Shakespeare calibration plays; perplexity on the held-out plays")


def test_every_material_is_judged_against_admm_grad_and_alps():
    assert set(preset_protocol.MATERIALS) == {"tuning", "other-text", "other-model"}
    with pytest.raises(SystemExit):
        preset_protocol.parse_args(["--methods", "admm,admm-accurate", "--out", "x"])
    args = preset_protocol.parse_args(["--methods", "admm;alps;admm-accurate+tune", "--out", "x"])
    assert args.method_labels == ["admm", "alps", "admm-accurate+tune"]


def test_tuned_preset_specs_take_options():
    """admm-accurate+tune:tune_lr=1e-3 is the tuned preset with one option overridden (a learning-rate
    sweep under the protocol); +tune after a method without a preset is refused."""
    specs = model_quality.parse_specs("admm;admm-accurate+tune:tune_lr=1e-3;admm-accurate+tune")
    assert specs["admm-accurate+tune:tune_lr=1e-3"].options == {"preset": "accurate+tune", "tune_lr": 1e-3}
    assert specs["admm-accurate+tune"].options == {"preset": "accurate+tune"}
    with pytest.raises(ValueError, match="follows a preset"):
        model_quality.parse_specs("admm+tune:tune_lr=1e-3")
