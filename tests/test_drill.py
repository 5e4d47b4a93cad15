"""`supervise drill`: plans and verdict rules as plain functions; one real drill run (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from supervisor.drill import DRILLS, plan, resumes_lost_nothing
from supervisor.errors import SuperviseError
from supervisor.launch.chaos import ChaosEvent, demo_plan, due, watched_saves
from supervisor.ledger.events import Event
from tests.local_jobs import stop_local_jobs


def test_every_drill_has_a_seeded_plan_inside_the_run():
    for drill in DRILLS:
        a = plan(drill, steps=12, interval=3, num_nodes=2, seed=5)
        assert a == plan(drill, steps=12, interval=3, num_nodes=2, seed=5) and a
        assert all(1 <= ev.at_step < 12 and 0 <= ev.node < 2 for ev in a)
    save = plan("kill-during-save", steps=12, interval=3, num_nodes=2, seed=1)[0]
    assert save.during_save and save.at_step % 3 == 0 and save.at_step >= 6, "a committed step exists before it"
    assert [ev.kind for ev in plan("corrupt-newest", steps=12, interval=3, num_nodes=2, seed=0)] == ["kill", "corrupt"]
    with pytest.raises(SuperviseError, match="no room"):
        plan("kill", steps=5, interval=3, num_nodes=1, seed=0)


def test_the_demo_is_a_drill_set():
    assert plan("demo", steps=24, interval=6, num_nodes=2, seed=3) == demo_plan(steps=24, interval=6, num_nodes=2, seed=3)
    with pytest.raises(SuperviseError, match="leave no room") as err:
        plan("demo", steps=6, interval=6, num_nodes=2, seed=0)
    assert err.value.exit_code == 2


def test_save_triggered_events_wait_for_the_save_not_the_step():
    ev = [ChaosEvent("kill", 6, 0, during_save=True), ChaosEvent("notice", 4, 1)]
    assert watched_saves(ev, set(), 4) == [] and watched_saves(ev, set(), 5) == [6]
    assert due(ev, set(), 9, live=True) == [1], "step 9 passed 6, but no save of step 6 was seen in flight"
    assert due(ev, set(), 5, live=True, saving={6}) == [0, 1]
    assert watched_saves(ev, {0}, 7) == []


def _ev(t, kind, inc="0", **fields):
    return Event(kind=kind, t=t, time="", writer="w", incarnation=inc, fields=fields)


def test_nothing_committed_lost_means_each_restart_resumed_from_the_newest_commit():
    events = [_ev(1, "resume", step=None), _ev(2, "checkpoint_committed", step=3),
              _ev(3, "checkpoint_committed", step=6), _ev(5, "resume", "1", step=6)]
    assert resumes_lost_nothing(events, set())[0]
    behind = [*events[:3], _ev(5, "resume", "1", step=3)]
    ok, why = resumes_lost_nothing(behind, set())
    assert not ok and "step 6 was committed" in why
    assert resumes_lost_nothing(behind, corrupted={6})[0], "the drill corrupted step 6 itself: 3 is right"


def _drill(tmp_path, monkeypatch, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """`supervise drill llama3_debug ARGS --json` in a private SUPERVISE_HOME; stops what it leaves running."""
    env = {**os.environ, "SUPERVISE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", "from supervisor.cli import main; main()", "drill",
                               "llama3_debug", *args, "--set", "resources.num_nodes=1", "--json"],
                              env=env, capture_output=True, text=True, timeout=1500)
    finally:  # a drill killed by the timeout could not stop its jobs
        stop_local_jobs(monkeypatch, tmp_path / "home")
    assert proc.stdout.strip(), proc.stderr[-3000:]
    assert not any((tmp_path / "home" / "local").glob("*")), "drill removed its jobs"
    return proc, json.loads(proc.stdout)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # a reference and three drills, each a training with up to two restarts
def test_drill_kill_during_save_stall_rank_and_store_outage_each_pass(tmp_path, monkeypatch):
    """Three drills in one invocation (one reference run for all), one row each.
    kill-during-save: the local controller watches the bucket and SIGKILLs a node while a
    save's objects are landing (notice-during-save fires the same way; the trainer's side
    of a notice during an upload is tests/titan/test_commits.py's). stall-rank: the
    watchdog ends a stopped rank with 69. store-outage: the embedded store frozen
    (SIGSTOP) for 30 s while a save lands: the save and its commit finish once the store
    is back, no restart. Each is bit-identical to the reference. The notice, kill and
    corrupt-newest drills inject the events of the demo's drill set, which
    tests/test_demo.py runs on 2 nodes (CI time; every plan is checked above)."""
    drills = {"kill-during-save", "stall-rank", "store-outage"}
    proc, rows = _drill(tmp_path, monkeypatch, "--drills", ",".join(sorted(drills)), "--steps", "12", "--interval", "3")
    by = {row["drill"]: row for row in rows}
    assert proc.returncode == 0 and set(by) == drills, (rows, proc.stderr[-2000:])
    assert all(row["verdict"] == "PASS" for row in rows), rows
    [killed] = by["kill-during-save"]["injected"]
    assert killed.startswith("kill node 0 at step ") and by["kill-during-save"]["recoveries"] >= 1, by["kill-during-save"]
    assert any(69 in codes for codes in by["stall-rank"]["exit_codes"]), "the watchdog ends a stalled rank with 69"
    outage = by["store-outage"]
    [injected] = outage["injected"]
    assert injected.startswith("outage at step ") and "store frozen (SIGSTOP)" in injected, injected
    assert outage["recoveries"] == 0 and outage["exit_codes"] == [[0]], outage


def test_store_outage_needs_the_drills_own_store(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERVISE_HOME", str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-c", "from supervisor.cli import main; main()", "drill", "llama3_debug",
                           "--drills", "store-outage", "--set", "checkpoint.bucket=s3://elsewhere/runs"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "embedded store" in proc.stderr, proc.stderr
