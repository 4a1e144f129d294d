"""The time budget that bounds a monitor's sampled work, checked against a fake clock."""

import diag.stats.budget as budget_module
from diag.stats.budget import TimeBudget


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_budget_keeps_spending_under_its_share(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(budget_module.time, "perf_counter", clock)
    budget = TimeBudget(fraction=0.05, free_samples=3)
    budget.start()
    taken = 0
    for step in range(1, 1001):
        clock.now += 0.010  # a 10 ms training step
        if budget.allows():
            with budget.charge():
                clock.now += 0.004  # each sample costs 4 ms (40% of a step)
            taken += 1
    assert taken >= 3  # the free samples are always taken
    # 5% of the time: about 0.05 * 10 s / 4 ms = 125 samples (each sample also lengthens the elapsed time)
    assert 100 <= taken <= 140
    assert budget.spent <= 0.05 * clock.now + 0.004


def test_expensive_work_waits_until_it_fits(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(budget_module.time, "perf_counter", clock)
    budget = TimeBudget(fraction=0.02, free_samples=0)
    budget.start()
    taken = []
    for step in range(1, 201):
        clock.now += 0.4  # a 400 ms step
        if step % 25 == 0 and budget.allows(free=False):
            with budget.charge():
                clock.now += 0.2  # half a step
            taken.append(step)
    assert taken[0] == 25 and len(taken) <= 8  # not every scheduled pass (8 of them): 2% of 80 s is 1.6 s
    assert budget.spent <= 0.02 * clock.now + 0.2
