"""How long one move of the dashboard's threshold slider takes to re-plan and repaint (kernel side).

Setting the slider's value runs exactly what a drag in the browser runs in the kernel: the
observer re-makes the placement, re-prices it and updates every figure (in a live kernel the
figure updates are serialized into comm messages for the front end). The browser's own drawing
is not included; ``tests/browser`` measures a key press to a repainted heatmap end to end.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DragTiming:
    """Seconds per slider move (``times``), their median and maximum, and the GPU experts each move left."""

    times: tuple[float, ...]
    gpu_experts: tuple[int, ...]

    @property
    def median_s(self) -> float:
        """Median seconds per move."""
        return statistics.median(self.times)

    @property
    def max_s(self) -> float:
        """Slowest move."""
        return max(self.times)


def time_threshold_drag(dashboard, steps: int = 20) -> DragTiming:
    """Move ``dashboard.threshold`` from its maximum down to near zero in ``steps`` moves (as a drag
    does) and time each one, from setting the value to the last figure updated."""
    if steps < 2:
        raise ValueError(f"time_threshold_drag needs at least 2 steps, got {steps}")
    slider = dashboard.threshold
    if dashboard.strategy.value != "threshold":
        dashboard.strategy.value = "threshold"
    times, gpu = [], []
    for value in np.linspace(slider.max, slider.max / steps, steps):
        t0 = time.perf_counter()
        slider.value = float(value)
        times.append(time.perf_counter() - t0)
        gpu.append(dashboard.session.placement.num_gpu_experts)
    return DragTiming(tuple(times), tuple(gpu))
