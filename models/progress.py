"""A progress bar that knows the run's real budget (steps, wall-clock minutes, or both).

``python -m models.train --minutes 3`` used to show ``0/100000`` and an ETA of hours, because the
bar counted towards ``--steps`` (default 100 000) although the clock stops the run after 3 minutes.
:class:`BudgetEstimate` works out what will actually happen: the run ends at whichever of
``steps`` and ``minutes`` comes first, so

* the expected total is ``min(steps, step_now + rate · time_left)`` steps (``rate`` = steps per
  second measured in this invocation), and
* the remaining time is ``min(budget − elapsed, (steps − step_now) / rate)``: under ``--minutes``
  it counts down the real wall clock, under ``--steps`` alone it is the usual rate estimate.

:class:`BudgetProgress` draws it with tqdm (when installed; else it is silent)::

    prior  37%|███▋      | 180/487 steps (est.) [01:06<01:54, 2.72 steps/s, loss=0.0100]

Both take an injectable ``clock`` (seconds, monotonic) so tests can drive them deterministically.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

__all__ = ["BudgetEstimate", "BudgetProgress", "default_threads"]


class BudgetEstimate:
    """Expected total steps and remaining seconds of a run limited by steps and/or minutes.

    Args:
        steps: the step limit (total, counting steps done before a resume).
        minutes: wall-clock budget of this invocation, or ``None`` for no time limit.
        initial_step: steps already done when this invocation starts (a resumed run).
        clock: ``() -> seconds``; ``time.perf_counter`` by default.
    """

    def __init__(
        self,
        steps: int,
        minutes: float | None = None,
        initial_step: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if minutes is not None and (not math.isfinite(minutes) or minutes <= 0):
            raise ValueError(f"minutes must be finite and > 0 (or None), got {minutes!r}")
        self.steps = steps
        self.budget_s = math.inf if minutes is None else 60.0 * float(minutes)
        self.initial_step = int(initial_step)
        self.clock = clock
        self.t0 = clock()

    @property
    def time_limited(self) -> bool:
        return math.isfinite(self.budget_s)

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def rate(self, step: int) -> float:
        """Steps per second in this invocation (0 before the first step)."""
        el = self.elapsed()
        done = step - self.initial_step
        return done / el if el > 0 and done > 0 else 0.0

    def expected_total(self, step: int) -> int:
        """The step count the run is expected to end at (``steps`` when only steps limit it, or
        while no rate is known yet; never below ``step``)."""
        if not self.time_limited:
            return self.steps
        r = self.rate(step)
        if r <= 0:
            return self.steps
        left = max(0.0, self.budget_s - self.elapsed())
        return max(step, min(self.steps, step + int(r * left)))

    def remaining(self, step: int) -> float:
        """Seconds until the run stops (``inf`` when unknown: no rate yet and no time limit)."""
        r = self.rate(step)
        by_steps = (self.steps - step) / r if r > 0 else math.inf
        if not self.time_limited:
            return by_steps
        return max(0.0, min(self.budget_s - self.elapsed(), by_steps))


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class BudgetProgress:
    """tqdm bar over steps whose total and remaining time follow :class:`BudgetEstimate`.

    ``update(step)`` after each step (the absolute step number); ``set_postfix(**kw)`` as in tqdm;
    ``close()`` at the end. Silent (and tqdm-free) when ``disable`` or tqdm is missing.
    """

    def __init__(
        self,
        steps: int,
        minutes: float | None = None,
        initial_step: int = 0,
        desc: str | None = None,
        disable: bool = False,
        clock: Callable[[], float] = time.perf_counter,
        **tqdm_kwargs,
    ) -> None:
        self.estimate = BudgetEstimate(steps, minutes, initial_step, clock)
        self._bar = None
        if disable:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional: train without a bar
            return
        est = self.estimate
        unit = "steps (est.)" if est.time_limited else "steps"

        class _Bar(tqdm):
            @property
            def format_dict(self):
                d = super().format_dict
                d["left"] = _fmt_seconds(est.remaining(int(d["n"])))
                return d

        self._bar = _Bar(
            total=self._total(initial_step),
            initial=initial_step,
            desc=desc,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} " + unit + " [{elapsed}<{left}, "
            "{rate_fmt}{postfix}]",
            unit="steps",
            **tqdm_kwargs,
        )

    def _total(self, step: int) -> int | None:
        # Under a time limit the total is unknown until a rate is measured: show "?", not --steps.
        est = self.estimate
        if est.time_limited and est.rate(step) <= 0 and est.steps > step:
            return None
        return est.expected_total(step)

    @property
    def total(self) -> int | None:
        """The bar's current expected total (None without a bar)."""
        return None if self._bar is None else self._bar.total

    def update(self, step: int) -> None:
        if self._bar is None:
            return
        self._bar.total = self._total(step)
        self._bar.update(step - self._bar.n)

    def set_postfix(self, **kwargs) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**kwargs)

    def close(self) -> None:
        if self._bar is not None:
            # The run is over: the total is what actually happened.
            self._bar.total = self._bar.n
            self._bar.refresh()
            self._bar.close()


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """Intra-op threads for a run given no ``--threads``: the cores other processes leave free.

    On a quiet machine that is every core. On a shared one, OpenMP threads that must wait for a
    core another process holds stall every parallel region: the photos quickstart measured 0.8
    steps/s with 2 threads against 6 steps/s with 1 thread on 2 cores at a load average near 5.
    ``OMP_NUM_THREADS`` (an explicit choice) is respected.

    Args:
        cores: CPU count (default ``os.cpu_count()``); load: 1-minute load average (default
            ``os.getloadavg()[0]``, 0 where unavailable).
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = cores or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            load = 0.0
    return max(1, min(cores, int(math.floor(cores - load + 0.5))))
