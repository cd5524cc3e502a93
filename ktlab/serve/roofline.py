"""The bandwidth-bound ideal of decode steps: what a step must read, and how fast that could go.

A decode step of B sequences reads, once, every expert its tokens select (the distinct ones per
layer: with random routing E * (1 - (1 - k/E)^B), far fewer than B * k) plus the dense weights
as stored. At the machine's read bandwidth that takes bytes / bandwidth seconds: the ideal.
The engine counts those bytes per step (:class:`StepBytes`, a route observer) so the server's
metrics and ``ktlab bench-serve`` put the ideal beside the measured speed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the bench client imports this module and needs no torch
    import torch


def versus_ideal(tokens: float, ideal_s: float, seconds: float) -> dict[str, float]:
    """Decode steps that made ``tokens`` tokens in ``seconds``, against the ``ideal_s`` seconds
    reading their weights takes at the read bandwidth (:class:`DecodeRoofline`): measured_tps,
    ideal_tps and share_of_ideal (0 where nothing was measured)."""
    return {
        "measured_tps": tokens / seconds if seconds > 0 else 0.0,
        "ideal_tps": tokens / ideal_s if ideal_s > 0 else 0.0,
        "share_of_ideal": ideal_s / seconds if seconds > 0 else 0.0,
    }


def effective_bandwidth(nbytes: float, ideal_s: float, fallback_gbs: float) -> float:
    """The bandwidth (GB/s) an ideal of ``ideal_s`` seconds assumed for ``nbytes`` (``fallback_gbs``
    before any bytes were counted)."""
    return nbytes / ideal_s / 1e9 if ideal_s > 0 else fallback_gbs


class StepBytes:
    """Counts the weight bytes of the model's last forward call: the distinct experts selected
    in each layer (it watches the router) times their stored size, plus the dense weights."""

    def __init__(self, model) -> None:
        self.dense_bytes = model.dense_weight_bytes()
        self.expert_bytes = model.expert_bytes()
        self._distinct = np.zeros(model.cfg.num_layers, dtype=np.int64)
        model.add_route_observer(self)

    def __call__(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Route observer: remember how many distinct experts this layer's tokens chose."""
        self._distinct[layer] = np.count_nonzero(np.bincount(ids.numpy().ravel()))  # distinct ids, no sort

    def take(self) -> int:
        """Bytes the last call had to read (and forget its expert counts)."""
        total = self.dense_bytes + int(self._distinct.sum()) * self.expert_bytes
        self._distinct[:] = 0
        return total


class DecodeRoofline:
    """The ideal seconds of the decode steps an engine ran: each step's bytes at the read
    bandwidth of its moment.

    With a ``probe`` (:class:`ktlab.benchmarks.machine.ReadProbe`) the bandwidth is re-measured
    every ``interval`` seconds while steps come in: on a shared host it swings by a factor of
    two within seconds, and an ideal from one figure at start would judge a run by the luck of
    that moment. A short probe reads low whenever a thread of its pool is preempted (a busy
    server, a benchmark client on the same cores), never high, so the steps since the last
    sample are taken at the best of the last ``window`` samples: the ideal errs fast, the
    share of it low. A probe stalls the engine while it reads, so probes take at most
    ``max_duty`` of the time: after a probe that took d seconds the next waits at least
    d / max_duty (a probe slowed by a busy machine: 20 ms instead of 4 spaced 2 s, not 0.5).
    """

    def __init__(self, bandwidth_gbs: float, probe: Callable[[], float] | None = None, interval: float = 0.5,
                 window: int = 8, clock: Callable[[], float] = time.monotonic, max_duty: float = 0.01) -> None:
        if not bandwidth_gbs > 0:
            raise ValueError(f"bandwidth must be > 0 GB/s, got {bandwidth_gbs!r}")
        if not interval > 0:
            raise ValueError(f"the probe interval must be > 0 s, got {interval!r}")
        if window < 1:
            raise ValueError(f"the sample window must be >= 1, got {window!r}")
        if not 0 < max_duty <= 1:
            raise ValueError(f"the probe's duty must be in (0, 1], got {max_duty!r}")
        self.bandwidth_gbs = float(bandwidth_gbs)  # the figure steps are taken at now
        self._recent: deque[float] = deque([self.bandwidth_gbs], maxlen=window)
        self.samples = 0
        self.probe, self.interval, self.max_duty, self._clock = probe, interval, max_duty, clock
        self._settled_seconds = 0.0
        self._pending_bytes = 0
        self._last_sample = clock()
        self._wait = interval  # seconds from the last sample to the next

    def add_step(self, nbytes: int) -> None:
        """Count one decode step's bytes; sample the bandwidth if one is due."""
        if self.probe is None:
            self._settled_seconds += nbytes / (self.bandwidth_gbs * 1e9)
            return
        self._pending_bytes += nbytes
        start = self._clock()
        if start - self._last_sample >= self._wait:
            self._recent.append(float(self.probe()))
            self.bandwidth_gbs = max(self._recent)
            self._settled_seconds += self._pending_bytes / (self.bandwidth_gbs * 1e9)
            self._pending_bytes = 0
            self.samples += 1
            self._last_sample = self._clock()
            self._wait = max(self.interval, (self._last_sample - start) / self.max_duty)

    @property
    def ideal_seconds(self) -> float:
        """Seconds the counted steps' bytes take at the bandwidth (the current figure for steps
        since the last sample)."""
        return self._settled_seconds + self._pending_bytes / (self.bandwidth_gbs * 1e9)
