"""Chaos planning is pure: same seed, same plan; plans satisfy what the demo needs."""

import pytest

from supervisor.errors import SuperviseError
from supervisor.launch.chaos import ChaosEvent, demo_plan, due, parse_event, random_plan


@pytest.mark.parametrize("seed", range(20))
def test_demo_plan_is_reproducible_and_well_placed(seed):
    plan = demo_plan(steps=24, interval=4, num_nodes=2, seed=seed)
    assert plan == demo_plan(steps=24, interval=4, num_nodes=2, seed=seed)
    notice, kill, corrupt = plan
    assert (notice.kind, kill.kind, corrupt.kind) == ("notice", "kill", "corrupt")
    assert 4 < notice.at_step < kill.at_step < 24
    assert kill.at_step % 4 != 0, "a kill mid-interval loses real work"
    # two periodic commits between the notice and the kill: the corrupted newest one has a fallback
    assert (kill.at_step // 4) - (notice.at_step // 4) >= 2
    assert corrupt.at_step == kill.at_step
    assert {notice.node, kill.node} <= {0, 1}


def test_demo_plan_differs_across_seeds_and_rejects_short_runs():
    assert len({tuple(demo_plan(steps=40, interval=4, num_nodes=2, seed=s)) for s in range(10)}) > 1
    with pytest.raises(ValueError):
        demo_plan(steps=8, interval=4, num_nodes=2, seed=0)


def test_random_plan_is_seeded():
    a = random_plan(steps=100, num_nodes=2, seed=7, count=5, kinds=("notice", "kill", "stall"))
    assert a == random_plan(steps=100, num_nodes=2, seed=7, count=5, kinds=("notice", "kill", "stall"))
    assert a != random_plan(steps=100, num_nodes=2, seed=8, count=5, kinds=("notice", "kill", "stall"))
    assert [e.at_step for e in a] == sorted(e.at_step for e in a)
    assert all(2 <= e.at_step < 100 and e.node in (0, 1) for e in a)


def test_due_fires_each_event_once_in_order_and_corrupt_only_between_incarnations():
    plan = [ChaosEvent("notice", 5), ChaosEvent("kill", 9, 1), ChaosEvent("corrupt", 9)]
    assert due(plan, set(), None, live=True) == []
    assert due(plan, set(), 4, live=True) == []
    assert due(plan, set(), 6, live=True) == [0]
    assert due(plan, {0}, 12, live=True) == [1]
    assert due(plan, {0, 1}, 12, live=True) == []
    assert due(plan, {0, 1}, 12, live=False) == [2]
    assert due(plan, {0, 1}, 8, live=False) == []


def test_parse_event():
    assert parse_event("notice@5:node1") == ChaosEvent("notice", 5, 1)
    assert parse_event("corrupt@9") == ChaosEvent("corrupt", 9, 0)
    with pytest.raises(SuperviseError, match="KIND@STEP"):
        parse_event("explode@3")
