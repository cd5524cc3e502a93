"""An observable stream of step metrics that widgets and plots watch (never the engine itself).

The engine side calls :meth:`Telemetry.publish` after each step; subscribers (a plot, a label)
get the latest metrics at most ``max_hz`` times per second, so a fast decode loop cannot flood
the notebook's front end; :meth:`flush` delivers the last pending update. The full history
(bounded) is kept for plots that redraw from scratch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

Subscriber = Callable[[dict], None]


class Telemetry:
    """Step metrics with throttled delivery to subscribers; thread-safe."""

    def __init__(self, max_hz: float = 10.0, history: int = 10_000, clock: Callable[[], float] = time.monotonic):
        if max_hz <= 0 or history < 1:
            raise ValueError(f"Telemetry needs max_hz > 0 and history >= 1, got {max_hz}, {history}")
        self.min_interval = 1.0 / max_hz
        self.history: deque[dict] = deque(maxlen=history)
        self._subscribers: list[Subscriber] = []
        self._clock = clock
        self._last_emit = -float("inf")
        self._pending: dict | None = None
        self._lock = threading.Lock()

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call ``fn(metrics)`` on (throttled) updates; returns a function that unsubscribes."""
        with self._lock:
            self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn) if fn in self._subscribers else None

    def publish(self, **metrics) -> None:
        """Record one step's metrics (a ``t`` timestamp is added) and notify if due."""
        now = self._clock()
        record = {"t": now, **metrics}
        with self._lock:
            self.history.append(record)
            due = now - self._last_emit >= self.min_interval
            if due:
                self._last_emit = now
                self._pending = None
            else:
                self._pending = record
            subscribers = list(self._subscribers) if due else []
        for fn in subscribers:
            fn(record)

    def flush(self) -> None:
        """Deliver the last update that the throttle held back, if any."""
        with self._lock:
            record, self._pending = self._pending, None
            if record is not None:
                self._last_emit = self._clock()
            subscribers = list(self._subscribers) if record is not None else []
        for fn in subscribers:
            fn(record)
