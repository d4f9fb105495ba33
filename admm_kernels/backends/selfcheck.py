"""Kernels that check themselves: each op's kernel run once on small inputs against the reference.

The CUDA and Triton kernels cannot be tested in CI (no GPU there), so before the registry hands out a
kernel of a backend in SELF_CHECKED for the first time on a device in this process, it runs that kernel
on the small fixed inputs of CASES and compares with the pure-torch reference run on the CPU (masks
exactly, values by the tolerance rule of _close below). A kernel that raises or disagrees is reported
with one warning naming it, and the registry uses the next backend for the rest of the process (ultimately the
reference, which is never checked). ADMM_KERNELS_SELF_CHECK=0 turns the check off.

The inputs are a few thousand elements per op (shapes that are not multiples of any block size, ties
in the scores, 16-bit inputs): a few milliseconds on a GPU, plus a Triton kernel's first compilation,
which the first real call would pay anyway. `admm-prune doctor` runs the same checks for every backend
and device, with timings (admm_kernels/doctor.py).

A kernel that corrupts the CUDA context (an illegal memory access) cannot be recovered from inside the
process: the check then raises on every later CUDA call too; `admm-prune doctor` is the way to see it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from . import reference
from ._modules import get

log = logging.getLogger("admm_kernels")

ENV_VAR = "ADMM_KERNELS_SELF_CHECK"
# Backends whose kernels are checked before first use: the ones no CI machine can run.
SELF_CHECKED = ("cuda", "triton")


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one kernel's check. seconds / reference_seconds: one call over all of the op's cases
    (the first, correctness call: it includes a Triton compilation), or the median of `repeat` timed
    calls when timing was asked for (doctor)."""

    backend: str
    op: str
    device: str
    ok: bool
    error: str
    seconds: float
    reference_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def enabled() -> bool:
    """False when ADMM_KERNELS_SELF_CHECK is 0/false/off/no."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def device_key(device: torch.device | str) -> torch.device:
    """The device with its index made explicit (cuda -> cuda:<current>), so each GPU is checked once."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


# --- the cases: (name, build inputs on the CPU) and how to compare ------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ties(rows: int, cols: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Scores with many ties (about 40 distinct values) and an all-zero row: the tie rules matter."""
    s = torch.round(torch.rand(rows, cols, generator=_gen(seed)) * 40) / 40
    s[rows // 2] = 0.0
    return s.to(dtype)


class Mismatch(AssertionError):
    """The kernel's output disagrees with the reference."""


def _same_mask(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.shape != want.shape or got.dtype != torch.bool:
        raise Mismatch(f"{what}: returned {got.dtype} {tuple(got.shape)}, expected bool {tuple(want.shape)}")
    if not torch.equal(got.cpu(), want):
        wrong = int((got.cpu() != want).sum())
        raise Mismatch(f"{what}: {wrong} of {want.numel()} mask entries differ from the reference")


def _close(got: torch.Tensor, truth: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """The tolerance rule: error against the fp64 truth at most 2x the fp32 reference's, plus a tiny slack."""
    got64 = got.detach().cpu().double()
    if got64.shape != truth.shape:
        raise Mismatch(f"{what}: shape {tuple(got64.shape)}, expected {tuple(truth.shape)}")
    if not torch.isfinite(got64).all():
        raise Mismatch(f"{what}: non-finite values")
    err = (got64 - truth).abs().max().item()
    err_ref = (ref.double() - truth).abs().max().item()
    slack = 1e-6 * max(1.0, truth.abs().max().item())
    if err > 2 * err_ref + slack:
        raise Mismatch(f"{what}: max error {err:.3g} against fp64, the reference's is {err_ref:.3g}")


def _gram_cases():
    for n, d, dtype in (
        (67, 45, torch.float32),
        (130, 257, torch.float32),
        (130, 257, torch.bfloat16),
        (70, 129, torch.float16),
    ):
        x = torch.randn(n, d, generator=_gen(d)).to(dtype)
        G0 = torch.randn(d, d, generator=_gen(d + 1))
        yield f"x {n}x{d} {str(dtype).replace('torch.', '')}", (G0, x)


def _gram_run(fn, device, G0, x):
    G, x = _on(device, (G0, x))
    fn(G, x)
    return G


def _gram_compare(out, G0, x, what):
    truth = G0.double() + torch.triu(x.double().T @ x.double())
    G_ref = G0.clone()
    reference.gram_update(G_ref, x)
    lower = torch.tril(torch.ones_like(G0, dtype=torch.bool), diagonal=-1)
    if not torch.equal(out.cpu()[lower], G0[lower]):
        raise Mismatch(f"{what}: the strict lower triangle was written")
    _close(torch.triu(out.cpu()), torch.triu(truth), torch.triu(G_ref), what)


def _prune_cases():
    for dtype in (torch.float32, torch.bfloat16):
        s = _ties(37, 300, 3, dtype)
        for per_row in (False, True):
            length = 300 if per_row else 37 * 300
            for k in (length // 2, int(length * 0.7) + 1):
                yield f"{str(dtype).replace('torch.', '')} 37x300 k={k} per_row={per_row}", (s, k, per_row)


def _nm_cases():
    for dtype in (torch.float32, torch.float16):
        s = _ties(19, 48, 5, dtype)
        for n, m in ((2, 4), (4, 8), (3, 6), (8, 16)):
            yield f"{str(dtype).replace('torch.', '')} 19x48 {n}:{m}", (s, n, m)


def _step_cases():
    rows, cols = 33, 300
    g = _gen(7)
    W, U, B = (torch.randn(rows, cols, generator=g) for _ in range(3))
    M = torch.rand(rows, cols, generator=g) < 0.5
    yield "contiguous 33x300", (W, U, M, B, 0.7, torch.empty(rows, cols))
    yield "transposed 300x33", (W.T, U.T, M.T, B.T, 0.7, torch.empty(cols, rows))


def _step_run(fn, device, W, U, M, B, rho, R):
    W, U, M, B, R = _on(device, (W, U, M, B, R))
    fn(W, U, M, B, rho, R)
    return U, R


def _step_compare(out, W, U, M, B, rho, R, what):
    U_ref, R_ref = U.clone(), R.clone()
    reference.admm_dual_step(W, U_ref, M, B, rho, R_ref)
    s = W.double() + U.double()
    Z = s * M
    U_truth = s - Z
    R_truth = B.double() + rho * (Z - U_truth)
    _close(out[0], U_truth, U_ref, f"{what}: U")
    _close(out[1], R_truth, R_ref, f"{what}: R")


def _packed_cases():
    for n, m, dtype in (
        (2, 4, torch.float32),
        (2, 4, torch.bfloat16),
        (1, 4, torch.float16),
        (3, 8, torch.float32),
    ):
        rows, cols = 21, 96
        w = torch.randn(rows, cols, generator=_gen(m + n))
        keep = reference.nm_mask(w.abs(), n, m)
        values, meta = reference.pack_nm((w * keep).to(dtype), n, m)
        x = torch.randn(5, cols, generator=_gen(11))
        yield f"{n}:{m} {str(dtype).replace('torch.', '')} 21x96 batch 5", (x, values, meta, n, m, cols)


def _csr_cases():
    for dtype, batch in ((torch.float32, 1), (torch.float32, 9), (torch.float16, 3)):
        rows, cols = 23, 150
        w = torch.randn(rows, cols, generator=_gen(13)) * (torch.rand(rows, cols, generator=_gen(14)) < 0.2)
        keep = w != 0
        crow = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)])
        col = keep.nonzero()[:, 1].to(torch.int16)  # row-major: ascending columns within each row
        x = torch.randn(batch, cols, generator=_gen(15))
        yield (
            f"{str(dtype).replace('torch.', '')} 23x150 batch {batch}",
            (x, crow, col, w[keep].to(dtype), cols),
        )


def _csr_dense(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, cols: int) -> torch.Tensor:
    """The (rows, cols) fp64 weight a CSR triple describes."""
    rows = crow.numel() - 1
    w = torch.zeros(rows, cols, dtype=torch.float64)
    w[torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1]), col.long()] = values.double()
    return w


def _on(device, args):
    """Fresh copies of the tensors among `args` on `device`, strides kept (in-place kernels must not
    change the cases, and .to() alone returns the same tensor when it is already there)."""
    return tuple(a.to(device, copy=True) if isinstance(a, torch.Tensor) else a for a in args)


def _mm_compare(out, x, *rest, ref_fn, what):
    """y = x @ Wᵀ of a sparse matmul against the fp64 product with the dense W the inputs describe."""
    if ref_fn is reference.sparse_nm_mm:
        values, meta, n, m, cols = rest
        w = reference.unpack_nm(values, meta, n, m, cols).double()
    else:
        w = _csr_dense(*rest)
    _close(out, x.double() @ w.T, ref_fn(x, *rest), what)


@dataclass(frozen=True)
class _Op:
    cases: Callable  # yields (label, CPU inputs)
    run: Callable  # (kernel, device, *inputs) -> output on the device
    compare: Callable  # (output, *inputs, what) -> None or raise Mismatch


CASES: dict[str, _Op] = {
    "gram_update": _Op(_gram_cases, _gram_run, _gram_compare),
    "prune_mask": _Op(
        _prune_cases,
        lambda fn, dev, *a: fn(*_on(dev, a)),
        lambda out, s, k, per_row, what: _same_mask(out, reference.prune_mask(s, k, per_row), what),
    ),
    "nm_mask": _Op(
        _nm_cases,
        lambda fn, dev, *a: fn(*_on(dev, a)),
        lambda out, s, n, m, what: _same_mask(out, reference.nm_mask(s, n, m), what),
    ),
    "admm_dual_step": _Op(_step_cases, _step_run, _step_compare),
    "sparse_nm_mm": _Op(
        _packed_cases,
        lambda fn, dev, *a: fn(*_on(dev, a)),
        lambda out, *a, what: _mm_compare(out, *a, ref_fn=reference.sparse_nm_mm, what=what),
    ),
    "unpack_nm": _Op(
        lambda: ((lbl, a[1:]) for lbl, a in _packed_cases()),
        lambda fn, dev, *a: fn(*_on(dev, a)),
        lambda out, *a, what: _same_values(out, reference.unpack_nm(*a), what),
    ),
    "csr_mm": _Op(
        _csr_cases,
        lambda fn, dev, *a: fn(*_on(dev, a)),
        lambda out, *a, what: _mm_compare(out, *a, ref_fn=reference.csr_mm, what=what),
    ),
}


def _same_values(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.dtype != want.dtype or not torch.equal(got.cpu(), want):
        raise Mismatch(f"{what}: differs from the reference ({got.dtype} vs {want.dtype})")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of `run`, the device synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - t0


def check(
    backend: str, op: str, device: torch.device | str, fn: Callable | None = None, repeat: int = 0
) -> CheckResult:
    """Run `fn` (default: backend `backend`'s implementation of `op`) on op's check inputs on `device`
    and compare with the reference. Never raises for a faulty kernel: the result says what went wrong.
    repeat > 0 also times `repeat` more calls of kernel and reference (medians are reported)."""
    if op not in CASES:
        raise ValueError(f"no self-check for op {op!r}; ops with one: {sorted(CASES)}")
    device = device_key(device)
    if fn is None:
        fn = getattr(get(backend), op)
    spec = CASES[op]
    cases = list(spec.cases())
    ref_fn = getattr(reference, op)

    def run_all(impl):
        return [spec.run(impl, device, *inputs) for _, inputs in cases]

    error, seconds = "", float("nan")
    try:
        t0 = time.perf_counter()
        outs = run_all(fn)
        synchronize(device)
        seconds = time.perf_counter() - t0
        for (label, inputs), out in zip(cases, outs):
            spec.compare(out, *inputs, what=label)
    except Mismatch as exc:
        error = f"disagrees with the reference: {exc}"
    except Exception as exc:  # noqa: BLE001 - any failure of an untested kernel must fall back, not crash
        error = f"raised {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    try:
        ref_seconds = timed(lambda: run_all(ref_fn), device)
    except Exception:  # noqa: BLE001 - e.g. a CUDA context the kernel left broken
        ref_seconds = float("nan")
    if repeat > 0 and not error:
        seconds = sorted(timed(lambda: run_all(fn), device) for _ in range(repeat))[repeat // 2]
        ref_seconds = sorted(timed(lambda: run_all(ref_fn), device) for _ in range(repeat))[repeat // 2]
    return CheckResult(backend, op, str(device), not error, error, seconds, ref_seconds)


# --- the registry's cache: one check per (backend, op, device) per process ----------------------------

_results: dict[tuple[str, str, str], CheckResult] = {}
_lock = threading.RLock()  # re-entrant: a kernel under check may itself select a kernel


def passed(backend: str, op: str, device: torch.device | str, fn: Callable) -> CheckResult:
    """The cached check of (backend, op, device), run now if it never ran in this process; a failure
    is logged once, as a warning naming the kernel."""
    key = (backend, op, str(device_key(device)))
    with _lock:
        result = _results.get(key)
        if result is None:
            result = check(backend, op, device, fn)
            _results[key] = result
            if not result.ok:
                log.warning(
                    "admm_kernels: the %s kernel of %s failed its self-check on %s and will not be used "
                    "in this process: %s (set %s=0 to skip the check)",
                    backend,
                    op,
                    result.device,
                    result.error,
                    ENV_VAR,
                )
    return result


def results() -> list[CheckResult]:
    """The checks run by the registry so far in this process."""
    with _lock:
        return list(_results.values())


def reset() -> None:
    """Forget every cached check (tests)."""
    with _lock:
        _results.clear()
