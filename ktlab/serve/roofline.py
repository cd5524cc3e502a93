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
        empty = np.zeros(0, dtype=np.int64)
        self._selected = [empty] * model.cfg.num_moe_layers
        self.last_selected: list[np.ndarray] = list(self._selected)  # per layer, of the call take() closed
        model.add_route_observer(self)

    def __call__(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Route observer: remember the distinct experts this layer's tokens chose."""
        self._selected[layer] = np.flatnonzero(np.bincount(ids.numpy().ravel()))  # distinct ids, no sort

    def take(self) -> int:
        """Bytes the last call had to read; its experts move to ``last_selected``."""
        total = self.dense_bytes + sum(len(s) for s in self._selected) * self.expert_bytes
        self.last_selected = self._selected
        self._selected = [s[:0] for s in self._selected]
        return total


class PairedReads:
    """The bandwidth-bound ideal measured on the step itself: right after a sampled decode step,
    read once the very bytes it had to read (its layers' selected experts and the dense weights,
    where they live: ``model.weight_regions``) and time that. A pure read of those bytes is the
    fastest the step could be at that moment, so ``read_seconds / step_seconds`` over the
    sampled steps is their share of the ideal without a bandwidth figure from another moment
    (the host's swings hit the step and its read alike; a figure from separate probes cannot
    follow them: with the best of eight 0.5 s probes even steps that are pure reads score
    0.78-0.84 here). The last bytes a step touched may still be in cache (a few MB of a GB).

    A read stalls the engine as long as a step, so reads take at most ``max_duty`` of the time:
    after one of d seconds the next waits max(``interval``, d / max_duty). The first decode step
    is always sampled."""

    def __init__(self, model, interval: float = 0.5, max_duty: float = 0.05,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not interval > 0 or not 0 < max_duty <= 1:
            raise ValueError(f"paired reads need interval > 0 and max_duty in (0, 1], got {interval!r}, {max_duty!r}")
        from ktlab.kernels import read_regions

        self.model, self.interval, self.max_duty = model, interval, max_duty
        self._clock, self._read = clock, read_regions
        model.weight_regions([np.zeros(0, dtype=np.int64)] * model.cfg.num_moe_layers)  # ValueError where unsupported
        self.steps = self.tokens = 0
        self.step_seconds = self.read_seconds = 0.0
        self._last = -float("inf")
        self._wait = interval

    def after_step(self, selected: list[np.ndarray], tokens: int, step_seconds: float) -> None:
        """A decode step of ``tokens`` tokens that took ``step_seconds`` and read the experts
        ``selected`` (per layer) ended: read its bytes again if a sample is due."""
        start = self._clock()
        if start - self._last < self._wait:
            return
        seconds = self._read(self.model.weight_regions(selected))
        self.steps += 1
        self.tokens += tokens
        self.step_seconds += step_seconds
        self.read_seconds += seconds
        self._last = self._clock()
        self._wait = max(self.interval, (self._last - start) / self.max_duty)

    def metrics(self) -> dict[str, float]:
        """Counters of the sampled steps and their share of the ideal (read / step seconds)."""
        return {"decode_paired_steps": self.steps, "decode_paired_tokens": self.tokens,
                "decode_paired_step_seconds": self.step_seconds, "decode_paired_read_seconds": self.read_seconds,
                "decode_paired_share": self.read_seconds / self.step_seconds if self.step_seconds > 0 else 0.0}


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
