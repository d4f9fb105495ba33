"""`admm-prune doctor` (admm_kernels/doctor.py): versions, devices, backends and each kernel's check
against the reference on this machine, as text or JSON; exit status 1 when a kernel fails its check."""

from __future__ import annotations

import json

import pytest
import torch

from admm_kernels import backends, cli
from admm_kernels.backends import selfcheck

pytestmark = pytest.mark.usefixtures("one_thread")


def _doctor(capsys, *args):
    rc = cli.main(["doctor", "--repeat", "1", *args])
    return rc, capsys.readouterr().out


def test_text_report(capsys):
    rc, out = _doctor(capsys)
    assert rc == 0, out
    assert f"torch {torch.__version__}" in out and "admm_kernels" in out
    assert "devices:" in out and "cpu" in out and "no CUDA device visible" in out
    for name in backends.BACKENDS:
        assert f"  {name} " in out
    assert "cuda       unavailable: no CUDA device" in out
    assert f"{selfcheck.ENV_VAR}=0 turns it off" in out
    if "cpu" in backends.available():
        for op in ("gram_update", "prune_mask", "nm_mask", "admm_dual_step", "sparse_nm_mm", "csr_mm"):
            assert any(line.split()[:4] == ["cpu", op, "cpu", "ok"] for line in out.splitlines()), (op, out)


def test_json_report(capsys):
    rc, out = _doctor(capsys, "--json")
    rep = json.loads(out)
    assert rc == 0
    assert rep["versions"]["torch"] == torch.__version__
    assert {b["backend"] for b in rep["backends"]} == set(backends.BACKENDS)
    assert rep["self_check_at_first_use"]["env_var"] == selfcheck.ENV_VAR
    if "cpu" in backends.available():
        checks = {(c["backend"], c["op"]) for c in rep["checks"] if c["ok"]}
        assert ("cpu", "admm_dual_step") in checks and ("cpu", "csr_mm") in checks
        assert rep["extension"]["importable"]


def test_a_failing_kernel_is_reported(capsys, monkeypatch):
    if "cpu" not in backends.available():
        pytest.skip("no C++ CPU backend built")
    monkeypatch.setattr(backends.get("cpu"), "nm_mask",
                        lambda s, n, m: torch.zeros(s.shape, dtype=torch.bool))
    rc, out = _doctor(capsys)
    assert rc == 1
    line = next(ln for ln in out.splitlines() if ln.split()[:2] == ["cpu", "nm_mask"])
    assert "FAIL" in line and "disagrees with the reference" in out


def test_bad_repeat(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["doctor", "--repeat", "0"])
    assert exc.value.code == 2
    assert "--repeat must be a positive integer, got '0'" in capsys.readouterr().err


def test_doctor_listed_in_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "doctor" in capsys.readouterr().out


def test_batched_expert_solve_is_checked_against_one_expert_at_a_time(capsys, monkeypatch):
    rc, out = _doctor(capsys)
    assert rc == 0 and "batched experts (ADMM-Grad) on cpu: ok" in out
    rc, out = _doctor(capsys, "--json")
    assert [c["ok"] for c in json.loads(out)["solver_checks"]] == [True]
    from admm_kernels import batched

    real = batched.run_batched

    def off_by_one(W, G, pattern, sparsity, o, dtype):
        results = real(W, G, pattern, sparsity, o, dtype)
        results[1].weight = results[1].weight * 1.01
        return results
    monkeypatch.setattr(batched, "run_batched", off_by_one)
    rc, out = _doctor(capsys)
    assert rc == 1 and "batched experts (ADMM-Grad) on cpu: FAIL" in out and "experts [1] differ" in out


def test_error_path_check_reports_a_crash(capsys, monkeypatch):
    """Bad input to a compiled kernel raises in a child process (ok); a child that dies of a signal, as
    every failed argument check did with a private C++ runtime in _C, is a failed check."""
    from admm_kernels import doctor
    from admm_kernels.backends import _extension

    if _extension.load() is None:
        pytest.skip("no compiled extension")
    assert [(c["device"], c["ok"]) for c in doctor.error_path_checks()] == [("cpu", True)]
    monkeypatch.setattr(doctor, "_BAD_INPUT_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    rc, out = _doctor(capsys)
    assert rc == 1 and "bad input raises, not crashes (child process) on cpu: FAIL" in out
    assert "exit status -11" in out
