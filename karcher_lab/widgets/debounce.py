"""Debounced background work for a panel: run a function after a quiet period, one run at a time,
with a busy indicator and an error area instead of exceptions.

Each control change calls :meth:`DebouncedRunner.schedule`, which (re)starts a timer of ``delay``
seconds; when it fires, the work runs on the timer's thread. :meth:`~DebouncedRunner.run` runs it now,
in the calling thread, cancelling a pending timer. A lock keeps runs from overlapping. While a run is in
progress the busy indicator shows ``busy_text``; any exception it raises is shown in the error area (its
type and message) and the run reports failure; a successful run clears the area.
"""
from __future__ import annotations

import html
import threading
from typing import Callable

import ipywidgets as widgets

from karcher_lab.errors import ParameterError

BUSY_CLASS = "kl-busy"
ERROR_CLASS = "kl-error"
BUSY_TEXT = "updating…"


class DebouncedRunner:
    """Runs ``work`` (no arguments, its result ignored) debounced and shielded (see the module docstring).

    Parameters
    ----------
    work : callable
        What one run does.
    delay : float
        Seconds without a new :meth:`schedule` before a scheduled run starts (≥ 0).

    Attributes
    ----------
    busy_indicator : ipywidgets.HTML
        CSS class ``kl-busy``: :data:`BUSY_TEXT` while a run is in progress, empty otherwise.
    error_area : ipywidgets.HTML
        CSS class ``kl-error``: the last run's error, empty after a success.
    """

    def __init__(self, work: Callable[[], object], delay: float):
        if delay < 0:
            raise ParameterError(f"debounce must be >= 0 seconds, got {delay}")
        self.work, self.delay = work, delay
        self.busy_indicator = widgets.HTML("")
        self.busy_indicator.add_class(BUSY_CLASS)
        self.error_area = widgets.HTML("")
        self.error_area.add_class(ERROR_CLASS)
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def schedule(self) -> None:
        """Start a run after ``delay`` seconds without another call (restarts the clock)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(self.delay, self._run)
        self._timer.daemon = True
        self._timer.start()

    def run(self) -> bool:
        """Run now in the calling thread (a pending scheduled run is cancelled); True on success, False
        when the work raised (the error is then shown in :attr:`error_area`)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return self._run()

    def wait(self, timeout: float | None = None) -> None:
        """Block until a scheduled run has started and finished and no run is in progress."""
        timer = self._timer
        if timer is not None:
            timer.join(timeout)
        if self._lock.acquire(timeout=-1 if timeout is None else timeout):
            self._lock.release()

    @property
    def error(self) -> str:
        """The text of the error shown ("" when the last run succeeded)."""
        return html.unescape(self.error_area.value.replace("<b>", "").replace("</b>", ""))

    @property
    def busy(self) -> bool:
        """Whether a run is in progress."""
        return self.busy_indicator.value != ""

    def _run(self) -> bool:
        with self._lock:
            self.busy_indicator.value = f"<span style='color:#d62728'>{BUSY_TEXT}</span>"
            try:
                self.work()
            except Exception as exc:  # every failure goes to the panel, never to the notebook
                self.error_area.value = f"<b>{html.escape(type(exc).__name__)}</b>: {html.escape(str(exc))}"
                return False
            else:
                self.error_area.value = ""
                return True
            finally:
                self.busy_indicator.value = ""
