"""models.progress: the bar's total and remaining time follow the real budget (steps or minutes)."""

from __future__ import annotations

import math

import pytest

from models.progress import BudgetEstimate, BudgetProgress


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_minutes_budget_sets_the_total_and_counts_down_the_clock():
    clock = FakeClock()
    est = BudgetEstimate(steps=100_000, minutes=1.0, clock=clock)
    assert est.expected_total(0) == 100_000  # no rate measured yet
    clock.t += 10.0  # 10 steps in 10 s -> 1 step/s, 50 s left
    assert est.expected_total(10) == 60
    assert est.remaining(10) == pytest.approx(50.0)
    clock.t += 40.0  # the run speeds up: 190 steps after 50 s -> 3.8 steps/s, 10 s left
    assert est.expected_total(190) == 190 + 38
    assert est.remaining(190) == pytest.approx(10.0)
    clock.t += 20.0  # over budget
    assert est.remaining(250) == 0.0 and est.expected_total(250) == 250


def test_steps_bind_before_minutes():
    clock = FakeClock()
    est = BudgetEstimate(steps=30, minutes=10.0, clock=clock)
    clock.t += 10.0  # 1 step/s: the 30 steps finish after 30 s, long before 10 minutes
    assert est.expected_total(10) == 30
    assert est.remaining(10) == pytest.approx(20.0)


def test_steps_only_and_resume():
    clock = FakeClock()
    est = BudgetEstimate(steps=500, minutes=None, initial_step=200, clock=clock)
    assert not est.time_limited and math.isinf(est.remaining(200))
    clock.t += 10.0  # 100 steps of this invocation in 10 s
    assert est.expected_total(300) == 500
    assert est.remaining(300) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="minutes"):
        BudgetEstimate(steps=10, minutes=0.0)
    with pytest.raises(ValueError, match="steps"):
        BudgetEstimate(steps=-1)


def test_bar_total_under_minutes(capsys):
    clock = FakeClock()
    bar = BudgetProgress(100_000, minutes=1.0, clock=clock, mininterval=0)
    assert bar.total is None  # no rate yet: unknown, not the 100 000 of --steps
    for step in range(1, 21):
        clock.t += 0.5  # 2 steps/s -> 20 steps after 10 s, 50 s left -> ~120 in total
        bar.update(step)
    assert bar.total == 120
    bar.set_postfix(loss="0.1")
    bar.close()
    assert bar.total == 20  # closed: the total is what happened
    err = capsys.readouterr().err
    assert "/120 steps (est.)" in err and "100000" not in err.splitlines()[-1]
    silent = BudgetProgress(10, disable=True)
    silent.update(3)
    silent.close()
    assert silent.total is None


def test_default_threads_leave_busy_cores(monkeypatch):
    from models.progress import default_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads(cores=2, load=0.1) == 2  # quiet machine: every core
    assert default_threads(cores=2, load=1.0) == 1
    assert default_threads(cores=2, load=5.7) == 1  # never below one
    assert default_threads(cores=16, load=3.2) == 13
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(cores=2, load=0.0) == 3  # an explicit choice wins
