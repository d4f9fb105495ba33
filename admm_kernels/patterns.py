"""Sparsity patterns: the `Pattern` type every solver, mask and run uses, and parsing a pattern string.

A leaf module (no admm_kernels imports): the methods, the masks, the pipeline and the CLI all read
patterns, so the type lives below all of them. The packed formats of admm_kernels.sparse read a stored
layout into the same type with admm_kernels.sparse.parse_packed_pattern (no in_features to check).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern: kind is "unstructured" (per layer), "per-row" or "nm" (n of every m)."""

    kind: str
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    def sparsity(self, requested: float) -> float:
        """The sparsity this pattern prunes to: `requested`, or 1 - n/m for N:M (which fixes it)."""
        return 1.0 - self.n / self.m if self.kind == "nm" else requested


def parse_pattern(pattern: object, in_features: int, name: str = "pattern") -> Pattern:
    """ "unstructured" | "per-row" | "N:M" (integers 1 <= N < M, M dividing in_features)."""
    if isinstance(pattern, Pattern):
        pattern = str(pattern)
    if not isinstance(pattern, str):
        raise TypeError(f"{name} must be a str ('unstructured', 'per-row' or 'N:M'), got {pattern!r}")
    p = pattern.strip().lower()
    if p in ("unstructured", "per-layer"):
        return Pattern("unstructured")
    if p in ("per-row", "per_row", "row"):
        return Pattern("per-row")
    if ":" in p:
        parts = p.split(":")
        # isascii: str.isdigit also accepts '２', '٢' or '²' (int() takes the first two, not the third)
        if len(parts) != 2 or not all(x.strip().isascii() and x.strip().isdigit() for x in parts):
            raise ValueError(f"{name} {pattern!r} is not of the form 'N:M' with integers N and M "
                             "(ASCII digits 0-9)")
        n, m = (int(x) for x in parts)
        if n < 1 or n >= m:
            raise ValueError(f"{name} {pattern!r}: N:M needs 1 <= N < M, got N={n}, M={m}")
        if in_features % m != 0:
            raise ValueError(f"{name} {pattern!r}: M={m} does not divide in_features={in_features}")
        return Pattern("nm", n, m)
    raise ValueError(f"unknown {name} {pattern!r}; expected 'unstructured', 'per-row' or 'N:M' (e.g. '2:4')")


def pattern_group(pattern: object) -> int:
    """M of an "N:M" pattern string whose M is a positive ASCII integer, else 1: an in_features that any
    valid pattern divides, for syntax checks before the layers are known:
    parse_pattern(p, pattern_group(p))."""
    tail = pattern.split(":")[-1].strip() if isinstance(pattern, str) and ":" in pattern else ""
    return int(tail) if tail.isascii() and tail.isdigit() and int(tail) > 0 else 1
