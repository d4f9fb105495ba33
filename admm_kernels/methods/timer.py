"""Seconds per phase of one method run."""

from __future__ import annotations

import time

import torch


class Timer:
    """Accumulates seconds per phase; synchronises CUDA so the phases are real."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap (or the start) to `phase`."""
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + (now - self._t)
        self._t = now
