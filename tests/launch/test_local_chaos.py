"""Chaos planning is pure: same seed, same plan; plans satisfy what the demo needs."""

import pytest

from supervisor.launch.chaos import ChaosEvent, demo_plan, due, min_demo_steps


@pytest.mark.parametrize("steps,interval", [(6, 1), (8, 2), (12, 3), (24, 6), (40, 4)])
@pytest.mark.parametrize("seed", range(12))
def test_demo_plan_is_reproducible_and_well_placed(seed, steps, interval):
    plan = demo_plan(steps=steps, interval=interval, num_nodes=2, seed=seed)
    assert plan == demo_plan(steps=steps, interval=interval, num_nodes=2, seed=seed)
    notice, kill, corrupt = plan
    assert (notice.kind, kill.kind, corrupt.kind) == ("notice", "kill", "corrupt")
    assert notice.deadline_s and notice.at_step > interval, "after the first periodic checkpoint"
    assert notice.at_step < kill.at_step < steps
    assert any(notice.at_step < s < kill.at_step for s in range(interval, steps, interval)), \
        "a commit newer than the notice's, so the corrupted newest one has a fallback"
    if interval > 1:
        assert kill.at_step % interval != 0, "a kill mid-interval loses real work"
    assert corrupt.at_step == kill.at_step
    assert {notice.node, kill.node} <= {0, 1}


def test_demo_plan_differs_across_seeds_and_rejects_short_runs():
    assert len({tuple(demo_plan(steps=40, interval=4, num_nodes=2, seed=s)) for s in range(10)}) > 1
    for interval in (1, 2, 3, 6):
        n = min_demo_steps(interval)
        for seed in range(20):
            demo_plan(steps=n, interval=interval, num_nodes=2, seed=seed)
        with pytest.raises(ValueError, match="no room"):
            demo_plan(steps=n - 1, interval=interval, num_nodes=2, seed=0)


def test_due_fires_each_event_once_in_order_and_corrupt_only_between_incarnations():
    plan = [ChaosEvent("notice", 5), ChaosEvent("kill", 9, 1), ChaosEvent("corrupt", 9)]
    assert due(plan, set(), None, live=True) == []
    assert due(plan, set(), 4, live=True) == []
    assert due(plan, set(), 6, live=True) == [0]
    assert due(plan, {0}, 12, live=True) == [1]
    assert due(plan, {0, 1}, 12, live=True) == []
    assert due(plan, {0, 1}, 12, live=False) == [2]
    assert due(plan, {0, 1}, 8, live=False) == []
    outage = [ChaosEvent("outage", 4, during_save=True, duration_s=30)]
    assert due(outage, set(), 9, live=True, saving={4}) == due(outage, set(), 9, live=False) == [], \
        "the store's owner fires an outage, never the local controller"
