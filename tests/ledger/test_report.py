"""Report math on hand-built ledgers with known answers; the five parts always tile wall time."""

from __future__ import annotations

import math
import random

import pytest

from supervisor.ledger.prices import Price
from supervisor.ledger.timeline import KEYS, build_timeline, summarize, young_daly
from tests.ledger.runs import T0, chaos_run, ev, steps

PARTS = [f"{k}_s" for k in KEYS]


def _adds_up(r: dict) -> None:
    assert sum(r[k] for k in PARTS) == pytest.approx(r["wall_s"], abs=1e-6)
    assert abs(r["residual_s"]) < 1e-6
    assert all(r[k] >= 0 for k in PARTS)


def test_chaos_run_numbers_are_exact():
    events, expect = chaos_run()
    r = summarize(events)
    _adds_up(r)
    for key in ("wall_s", "productive_s", "checkpoint_s", "lost_s", "recovery_s", "queue_s"):
        assert r[key] == pytest.approx(expect[key], abs=1e-6), key
    assert r["goodput"] == pytest.approx(expect["productive_s"] / expect["wall_s"])
    assert r["preemptions"] == {"notice": 1, "no_notice": 1}
    assert r["failures"] == 0 and r["recoveries"] == 2
    assert r["steps"] == {"first": 1, "last": 16, "productive": 16, "recomputed": 2,
                          "mean_step_s": pytest.approx(expect["productive_s"] / 16)}
    first, second = r["interruptions"]
    assert (first["cause"], first["resumed_step"], second["cause"], second["saved_step"]) == ("no_notice", 8, "notice", 12)
    assert first["lost_s"] == pytest.approx(2.65) and second["lost_s"] == 0  # saved on notice
    assert r["breakdown"]["shutdown_s"] == pytest.approx(0.05) and r["breakdown"]["teardown_s"] == pytest.approx(0.2)
    assert r["state"] == "SUCCEEDED" and r["problems"] == []


def test_reused_incarnation_labels_and_no_first_step_give_the_same_numbers():
    """A backend that labels every incarnation alike, a trainer that never says first_step."""
    from dataclasses import replace

    events, expect = chaos_run()
    same = [replace(e, incarnation="0", kind="progress" if e.kind == "first_step" else e.kind) for e in events]
    r = summarize(same)
    _adds_up(r)
    for key in ("productive_s", "checkpoint_s", "lost_s", "recovery_s", "queue_s"):
        assert r[key] == pytest.approx(expect[key], abs=1e-6), key
    assert r["preemptions"] == {"notice": 1, "no_notice": 1}


def test_uninterrupted_run_has_no_lost_or_recovery_time():
    events = [ev(0, "launch", num_nodes=1), ev(2, "node_start")]
    body, t = steps("i0", 3.0, 1, 8, ckpt_every=4, save_s=0.5, commit_s=0.5)
    events += body + [ev(t + 1, "job_finished", state="SUCCEEDED")]
    r = summarize(events)
    _adds_up(r)
    assert r["lost_s"] == 0 and r["recovery_s"] == 0
    assert r["queue_s"] == pytest.approx(4.0 + 1)  # 2 s queue + start-up to the end of step 1 + tear-down
    # both saves (the loop waits) and the last commit (the loop waited for it at the end); step 4's
    # commit ran beside training (rank 0's committer thread): productive
    assert r["checkpoint_s"] == pytest.approx(1.5)
    assert r["productive_s"] == pytest.approx(7.5)
    assert r["preemptions"] == {"notice": 0, "no_notice": 0}
    assert r["advice"]["message"] == "not enough preemptions observed"


def test_fallback_to_an_older_checkpoint_counts_all_recomputed_work_as_lost():
    """i0 saves 4 and 8, dies; i1 resumes 8, saves 12, dies; step 12 is corrupt, so i2 resumes from 8:
    all of i1's steps after 8 were wasted (and i0's steps past 8)."""
    events = [ev(0, "launch"), ev(0, "node_start")]
    body, t = steps("i0", 0.0, 1, 10, ckpt_every=4, save_s=1, commit_s=0)
    events += body + [ev(t + 0.5, "exit", "i0", code=69), ev(t + 1, "recovery_started", "c", "c", reason="error")]
    events += [ev(t + 1, "node_start", "i1"), ev(t + 1, "resume", "i1", step=8)]
    body, t = steps("i1", t + 1, 9, 14, ckpt_every=4, save_s=1, commit_s=0)
    events += body + [ev(t + 0.5, "exit", "i1", code=69), ev(t + 1, "recovery_started", "c", "c")]
    events += [ev(t + 1, "node_start", "i2"), ev(t + 1, "resume", "i2", step=8, skipped=[[12, "truncated"]])]
    body, t = steps("i2", t + 1, 9, 16, ckpt_every=4, save_s=1, commit_s=0)
    events += body + [ev(t, "job_finished", state="SUCCEEDED")]
    r = summarize(events)
    _adds_up(r)
    tl = build_timeline(events)
    # i0: steps 9, 10 + 0.5 s; i1: everything after its first step (steps 10..14 = 5 s) + 0.5 s, minus its save of 12
    assert r["lost_s"] == pytest.approx(2.5 + 5.5)
    assert r["checkpoint_s"] == pytest.approx(5)  # i0: 4, 8; i1: 12 (later corrupt); i2: 12, 16
    assert [w.keep_step for w in tl.windows] == [8, 8, math.inf]
    assert r["steps"]["recomputed"] == 2 + 6  # i0: 9-10; i1: 9-14
    assert r["failures"] == 2 and r["preemptions"] == {"notice": 0, "no_notice": 0}


def test_premature_preempted_signal_does_not_cut_training_short():
    """A launcher that records `preempted` when it sends the notice: the trainer keeps
    working (and saving) until it exits; that time is training and checkpoint, not recovery."""
    events = [ev(0, "launch"), ev(0, "node_start")]
    body, t = steps("i0", 0.0, 1, 5)
    events += body + [ev(t, "preempted", "launcher", "launcher", with_notice=True)]
    events += [ev(t + 1, "progress", "i0", step=6), ev(t + 2, "checkpoint_saved", "i0", step=6, duration_s=1.0),
               ev(t + 2.1, "exit", "i0", code=75), ev(t + 3, "recovery_started", "c", "c")]
    events += [ev(t + 4, "job_finished", state="CANCELLED")]
    r = summarize(events)
    _adds_up(r)
    assert r["breakdown"]["detection_s"] == pytest.approx(0.9)
    assert r["checkpoint_s"] == pytest.approx(1.0)
    assert r["preemptions"] == {"notice": 1, "no_notice": 0}


def test_running_job_and_missing_launch():
    body, t = steps("i0", 0.0, 1, 3)
    r = summarize([ev(0, "node_start")] + body)
    _adds_up(r)
    assert r["state"] == "running" and r["wall_s"] == pytest.approx(3)
    assert any("no launch event" in p for p in r["problems"])


def test_user_error_is_a_failure_not_a_preemption():
    events = [ev(0, "launch"), ev(1, "node_start"), ev(2, "exit", code=78, reason="bad config"),
              ev(3, "job_finished", state="FAILED")]
    r = summarize(events)
    _adds_up(r)
    assert r["failures"] == 1 and r["preemptions"] == {"notice": 0, "no_notice": 0} and r["recoveries"] == 0


def test_teardown_echo_does_not_turn_a_kill_into_a_notice():
    events = [ev(0, "launch"), ev(0, "node_start")]
    body, t = steps("i0", 0.0, 1, 4)
    events += body + [ev(t + 0.1, "chaos", "0", "controller", action="kill", node=1),
                      ev(t + 0.3, "preempted", "i0", "controller", with_notice=False),
                      ev(t + 0.5, "preempted", "i0", "node0", with_notice=True, saved_step=None),
                      ev(t + 1, "recovery_started", "c", "c"), ev(t + 2, "job_finished", state="CANCELLED")]
    r = summarize(events)
    _adds_up(r)
    assert r["preemptions"] == {"notice": 0, "no_notice": 1}
    assert r["breakdown"]["detection_s"] == pytest.approx(0.9)  # from the kill itself


@pytest.mark.parametrize("seed", range(25))
def test_random_runs_always_tile_wall_time(seed):
    rng = random.Random(seed)
    events = [ev(0, "launch", num_nodes=rng.randint(1, 3))]
    t, resume, inc = rng.uniform(0, 5), 0, 0
    saved: list[int] = [0]
    while True:
        events.append(ev(t, "node_start", f"i{inc}"))
        events.append(ev(t + 0.1, "resume", f"i{inc}", step=resume or None))
        last = resume + rng.randint(1, 12)
        body, t = steps(f"i{inc}", t + rng.uniform(0.5, 3), resume + 1, last, step_s=rng.uniform(0.1, 1),
                        ckpt_every=rng.randint(1, 5), save_s=rng.uniform(0, 0.5), commit_s=rng.uniform(0, 0.2))
        events += body
        saved += [e.get("step") for e in body if e.kind == "checkpoint_committed"]
        if inc >= 4 or rng.random() < 0.25:
            events.append(ev(t + 0.1, "job_finished", state="SUCCEEDED"))
            break
        t += rng.uniform(0, 1)
        kind = rng.choice(["notice", "kill", "crash"])
        events.append(ev(t, "preempted", "c", "c", with_notice=kind == "notice") if kind != "crash"
                      else ev(t, "exit", f"i{inc}", code=69))
        t += rng.uniform(0, 2)
        events.append(ev(t, "recovery_started", "c", "c"))
        t += rng.uniform(0, 3)
        resume = rng.choice(saved[-2:])  # sometimes the newest is corrupt
        inc += 1
    rng.shuffle(events)
    r = summarize(events)
    _adds_up(r)
    assert r["preemptions"]["notice"] + r["preemptions"]["no_notice"] + r["failures"] == inc


def test_young_daly_and_advice():
    assert young_daly(2.0, 3600.0) == pytest.approx(120.0)
    assert young_daly(None, 100.0) is None
    events, _ = chaos_run()
    r = summarize(events)
    a = r["advice"]
    # only the kill lost work: the notice preemption was saved, it does not shorten the interval
    assert a["interruptions_counted"] == 1
    held = r["wall_s"] - r["breakdown"]["queue_s"] - r["breakdown"]["provisioning_s"]
    assert a["mtbf_s"] == pytest.approx(held)
    assert a["save_cost_s"] == pytest.approx(0.75)
    assert a["interval_s"] == pytest.approx(math.sqrt(2 * 0.75 * held))
    assert a["interval_steps"] == round(a["interval_s"] / r["steps"]["mean_step_s"])


def test_cost_uses_held_node_hours():
    events, _ = chaos_run()
    r = summarize(events, price=Price(spot=10.0, on_demand=30.0, source="test"))
    held_h = 2 * (r["wall_s"] - r["breakdown"]["queue_s"] - r["breakdown"]["provisioning_s"]) / 3600
    c = r["cost"]
    assert c["node_hours"] == pytest.approx(held_h)
    assert c["spot_usd"] == pytest.approx(10 * held_h) and c["on_demand_usd"] == pytest.approx(30 * held_h)
    assert c["savings_usd"] == pytest.approx(20 * held_h) and c["price_source"] == "test"
    assert r["nodes"] == 2 and r["accelerators"] == "H100:8"
    assert r["start"] == T0 < r["end"] and r["started_at"].startswith("2023-11-14T22:13:20")
