"""A dashboard button whose work runs in a background thread, with a progress bar and a status line.

The notebook kernel stays responsive while the work runs (the dashboard's long runs go through
the engine, a few seconds each); the button is disabled until it ends, and a failure shows up in
the status line instead of vanishing in a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from ktlab.lab.workloads import Progress


class BackgroundJob:
    """``work(progress)`` in a thread when the button is clicked; ``done(result)`` returns the status text."""

    def __init__(self, description: str, icon: str, work: Callable[[Progress], Any], done: Callable[[Any], str],
                 tooltip: str = "") -> None:
        self.button = w.Button(description=description, icon=icon, tooltip=tooltip)
        self.progress = w.IntProgress(value=0, min=0, max=1, layout={"width": "160px", "visibility": "hidden"})
        self.status = w.Label()
        self.widget = w.HBox([self.button, self.progress, self.status])
        self._work, self._done = work, done
        self.thread: threading.Thread | None = None
        self.button.on_click(lambda _button: self.start())

    def _report(self, done: int, total: int) -> None:
        self.progress.max = max(1, total)
        self.progress.value = min(done, self.progress.max)
        self.status.value = f"{done}/{total}"

    def _run(self) -> None:
        try:
            self.status.value = self._done(self._work(self._report))
        except Exception as exc:  # shown to the user, not lost in the thread
            self.status.value = f"failed: {type(exc).__name__}: {exc}"
        finally:
            self.progress.layout.visibility = "hidden"
            self.button.disabled = False

    def start(self) -> threading.Thread:
        """Run the work now (what a click does); returns the thread."""
        self.button.disabled = True
        self.progress.value, self.progress.layout.visibility = 0, "visible"
        self.status.value = "running..."
        self.thread = threading.Thread(target=self._run, name=f"ktlab-lab-{self.button.description}", daemon=True)
        self.thread.start()
        return self.thread

    def wait(self, timeout: float | None = None) -> None:
        """Block until the last run has ended (tests, scripts)."""
        if self.thread is not None:
            self.thread.join(timeout)
