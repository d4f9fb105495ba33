"""Kernels that check themselves (admm_kernels/backends/selfcheck.py): a GPU backend's kernel that raises or
disagrees with the reference on its first use is logged once and replaced by the next backend.

No GPU here, so the `cuda` and `triton` backends are made to claim the CPU (fake is_available/supports)
with faulty kernels; the registry must then hand out the reference."""

from __future__ import annotations

import logging

import pytest
import torch

from admm_kernels import backends
from admm_kernels.backends import reference, selfcheck


@pytest.fixture
def fake_gpu(monkeypatch, no_forced_backend):
    """Returns make(backend, op, impl): `backend` claims the CPU with `impl` as its kernel of `op`, and
    is the CPU's first preference; the check cache is empty before and after."""
    monkeypatch.delenv(selfcheck.ENV_VAR, raising=False)
    selfcheck.reset()

    def make(backend: str, op: str, impl):
        mod = backends.get(backend)
        monkeypatch.setattr(mod, "is_available", lambda: True)
        monkeypatch.setattr(mod, "supports", lambda device: torch.device(device).type == "cpu")
        monkeypatch.setattr(mod, op, impl, raising=False)
        monkeypatch.setitem(backends.PREFERENCE, "cpu", (backend, "reference"))
        return mod

    yield make
    selfcheck.reset()


def _counting(fn):
    def wrapper(*args):
        wrapper.calls += 1
        return fn(*args)

    wrapper.calls = 0
    return wrapper


def _raises(*args):
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


def _wrong_nm(scores, n, m):
    return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)  # keeps everything


def _wrong_step(W, U, M, B, rho, R):
    reference.admm_dual_step(W, U, M, B, rho, R)
    R.mul_(1.001)  # a small error, as a wrong rounding mode or a race would give


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op,faulty", [("prune_mask", _raises), ("nm_mask", _wrong_nm),
                                       ("admm_dual_step", _wrong_step), ("gram_update", _raises)])
def test_faulty_gpu_kernel_falls_back_to_the_reference(fake_gpu, caplog, backend, op, faulty):
    bad = _counting(faulty)
    fake_gpu(backend, op, bad)
    with caplog.at_level(logging.WARNING, logger="admm_kernels"):
        name, fn = backends.select(op, "cpu")
        again = backends.select(op, "cpu")
    assert name == "reference" and fn is getattr(reference, op)
    assert again == (name, fn)
    assert bad.calls >= 1
    calls = bad.calls
    backends.select(op, "cpu")
    assert bad.calls == calls, "the check runs once per process and device"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    msg = warnings[0].getMessage()
    assert backend in msg and op in msg and "self-check" in msg and selfcheck.ENV_VAR in msg


def test_the_next_backend_is_used_when_it_passes(fake_gpu, monkeypatch):
    fake_gpu("cuda", "nm_mask", _wrong_nm)
    tr = backends.get("triton")
    monkeypatch.setattr(tr, "is_available", lambda: True)
    monkeypatch.setattr(tr, "supports", lambda device: True)
    monkeypatch.setattr(tr, "nm_mask", reference.nm_mask)
    monkeypatch.setitem(backends.PREFERENCE, "cpu", ("cuda", "triton", "reference"))
    assert backends.select("nm_mask", "cpu")[0] == "triton"


def test_a_correct_gpu_kernel_is_used(fake_gpu, caplog):
    good = _counting(reference.prune_mask)
    fake_gpu("cuda", "prune_mask", good)
    with caplog.at_level(logging.WARNING, logger="admm_kernels"):
        name, fn = backends.select("prune_mask", "cpu")
    assert name == "cuda" and fn is good and good.calls > 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.ok for r in selfcheck.results()] == [True]


def test_environment_variable_turns_the_check_off(fake_gpu, monkeypatch):
    bad = _counting(_raises)
    fake_gpu("cuda", "prune_mask", bad)
    monkeypatch.setenv(selfcheck.ENV_VAR, "0")
    name, fn = backends.select("prune_mask", "cpu")
    assert name == "cuda" and fn is bad and bad.calls == 0


def test_forced_backend_that_fails_its_check_raises(fake_gpu, monkeypatch):
    fake_gpu("triton", "nm_mask", _wrong_nm)
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    with pytest.raises(RuntimeError,
                       match=r"ADMM_KERNELS_BACKEND='triton'.*nm_mask.*self-check.*mask entries differ"):
        backends.select("nm_mask", "cpu")


def test_cpu_backend_is_not_checked_at_selection(no_forced_backend, monkeypatch):
    """Only backends CI cannot run are checked when selected (the cpu kernels have their own tests)."""
    selfcheck.reset()
    monkeypatch.setattr(selfcheck, "check", lambda *a, **k: pytest.fail("checked"))
    if "cpu" in backends.available():
        assert backends.select("nm_mask", "cpu")[0] == "cpu"


def test_mask_selection_uses_the_fallback(fake_gpu):
    """The solver's mask step goes through the registry: a faulty kernel never reaches prune_layer."""
    fake_gpu("cuda", "prune_mask", lambda s, k, per_row: torch.ones_like(s, dtype=torch.bool))
    used: dict = {}
    scores = torch.rand(8, 16)
    mask = backends.implementation("prune_mask", scores.device, used=used)(scores, 64, False)
    assert used["prune_mask"] == "reference" and int((~mask).sum()) == 64


@pytest.mark.parametrize("op", sorted(selfcheck.CASES))
def test_every_check_passes_for_the_reference_and_the_cpu_kernels(op):
    assert selfcheck.check("reference", op, "cpu").ok
    if "cpu" in backends.available() and hasattr(backends.get("cpu"), op):
        result = selfcheck.check("cpu", op, "cpu", repeat=1)
        assert result.ok, result.error
        assert result.seconds > 0 and result.reference_seconds > 0


@pytest.mark.parametrize("op", sorted(selfcheck.CASES))
def test_every_check_catches_a_small_error(op):
    """Each op's check can fail: the reference with a perturbed output is caught."""
    ref = getattr(reference, op)

    def perturbed(*args):
        out = ref(*args)
        if op == "gram_update":
            args[0][0, -1] += 1e-3 * (1 + args[0][0, -1].abs())
        elif op == "admm_dual_step":
            args[1][0, 0] += 1e-3
        elif out.dtype == torch.bool:
            out = out.clone()
            out[0, 0] = ~out[0, 0]
        else:
            out = out.clone()
            out.view(-1)[0] += 1e-2 * (1 + out.view(-1)[0].abs())
        return out

    result = selfcheck.check("fake", op, "cpu", perturbed)
    assert not result.ok and "disagrees with the reference" in result.error


def test_check_does_not_modify_its_cases():
    """In-place kernels get copies: the same cases give the same verdicts run after run."""
    assert selfcheck.check("reference", "admm_dual_step", "cpu").ok
    assert selfcheck.check("reference", "gram_update", "cpu").ok
    assert selfcheck.check("reference", "admm_dual_step", "cpu").ok


def test_unknown_op():
    with pytest.raises(ValueError, match="'no_such_op'"):
        selfcheck.check("cpu", "no_such_op", "cpu", lambda: None)
