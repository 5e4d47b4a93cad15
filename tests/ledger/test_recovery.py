"""Lost work as actually recomputed, recovery broken down, interval advice and `interval: auto`."""

from __future__ import annotations

import math

import pytest

from supervisor.ledger import interval
from supervisor.ledger.timeline import summarize
from tests.ledger.runs import chaos_run, ev, steps


def _throttled(inc: str, start_t: float, first: int, last: int, every: int) -> tuple[list, float]:
    """Steps first..last, 1 s each, with a progress event only every `every` steps (the trainer's throttle)."""
    body, t = steps(inc, start_t, first, last)
    return [e for e in body if e.kind == "first_step" or e.get("step") % every == 0 or e.get("step") == last], t


def test_lost_steps_count_what_the_next_start_recomputed():
    """A kill at step 9 reported by the chaos event, progress only every 5 steps, resume from 6:
    steps 7, 8, 9 were done twice (the seed-3 demo counted 1)."""
    events = [ev(0, "launch"), ev(0, "node_start")]
    body, t = steps("i0", 0.0, 1, 9, ckpt_every=6)
    events += [e for e in body if e.kind != "progress" or e.get("step") in (5, 6)]
    events += [ev(t + 0.2, "chaos", "0", "controller", action="kill", step=9),
               ev(t + 1, "recovery_started", "c", "c"), ev(t + 2, "node_start", "i1"),
               ev(t + 2.5, "resume", "i1", step=6)]
    body, t = steps("i1", t + 3, 7, 12)
    events += body + [ev(t + 0.5, "job_finished", state="SUCCEEDED")]
    r = summarize(events)
    ep = r["interruptions"][0]
    assert r["steps"]["recomputed"] == 3 == ep["lost_steps"]
    assert ep["lost_s"] == pytest.approx(3 + 0.2) == r["lost_s"]  # steps 7..9 and the 0.2 s of step 10


def test_a_notice_that_saved_everything_is_not_charged_for_a_later_fallback():
    """i0 saves step 6 on notice; i1 resumes 6, is killed at 9, and step 6 turns out corrupt, so
    i2 resumes from 3. What i0 did after 3 is lost because of the second interruption, not the notice
    (the seed-7 demo charged lost work to a notice that lost none)."""
    events = [ev(0, "launch"), ev(0, "node_start")]
    body, t = steps("i0", 0.0, 1, 6, ckpt_every=3)
    events += body + [ev(t + 0.1, "preempted", "i0", with_notice=True, saved_step=6),
                      ev(t + 0.2, "exit", "i0", code=75), ev(t + 1, "recovery_started", "c", "c"),
                      ev(t + 2, "node_start", "i1"), ev(t + 2.1, "resume", "i1", step=6)]
    body, t = steps("i1", t + 3, 7, 9)
    events += body + [ev(t + 0.3, "chaos", "1", "controller", action="kill", step=9),
                      ev(t + 1, "recovery_started", "c", "c"), ev(t + 2, "node_start", "i2"),
                      ev(t + 2.1, "resume", "i2", step=3, skipped=[[6, "truncated shard"]])]
    body, t = steps("i2", t + 3, 4, 10)
    events += body + [ev(t + 0.5, "job_finished", state="SUCCEEDED")]
    r = summarize(events)
    notice, kill = r["interruptions"]
    assert notice["cause"] == "notice" and notice["lost_s"] == 0 and notice["lost_steps"] == 0
    assert kill["lost_steps"] == (6 - 3) + (9 - 6) == r["steps"]["recomputed"]
    assert kill["lost_s"] == pytest.approx(r["lost_s"])


def test_recovery_is_broken_down_on_the_local_backend():
    """Local-backend shape: controller events, the setup mark, the trainer's load milestones."""
    events = [ev(0, "launch", backend="local", num_nodes=1)]
    events += [ev(3, "setup", "setup-node0", "setup-0", duration_s=2.0, code=0), ev(4, "node_start"),
               ev(6, "trainer_ready"), ev(6.5, "checkpoint_loaded", step=0)]
    body, t = steps("i0", 6.5, 1, 4, ckpt_every=2, save_s=0.5)
    events += body + [ev(t + 0.2, "chaos", "0", "controller", action="kill", step=4),
                      ev(t + 0.7, "recovery_started", "c", "c", reason="node lost"),
                      ev(t + 1.0, "node_start", "i1"), ev(t + 1.1, "resume", "i1", step=4),
                      ev(t + 3.0, "trainer_ready", "i1"), ev(t + 4.0, "checkpoint_loaded", "i1", step=4)]
    back = t + 4.0
    body, t = steps("i1", back, 5, 6)
    events += body + [ev(t + 0.1, "job_finished", state="SUCCEEDED")]
    r = summarize(events)
    assert r["phases"]["start"] == {"queue_s": 1.0, "provisioning_s": 0.0, "setup_s": 2.0, "startup_s": 3.0,
                                    "checkpoint_load_s": 0.5, "first_step_s": 1.0}
    ep = r["interruptions"][0]["phases"]
    assert ep["detection_s"] == pytest.approx(0.5) and ep["provisioning_s"] == pytest.approx(0.3)
    assert ep["startup_s"] == pytest.approx(2.0) and ep["checkpoint_load_s"] == pytest.approx(1.0)
    assert ep["first_step_s"] == pytest.approx(1.0)
    assert sum(ep.values()) == pytest.approx(r["interruptions"][0]["loss_to_first_step_s"])
    assert sum(r["badput"].values()) + r["productive_s"] == pytest.approx(r["wall_s"])
    assert r["badput"]["unproductive_checkpoint_restore_s"] == pytest.approx(1.5)
    assert r["badput"]["training_prep_s"] == pytest.approx(2.0)


def test_advice_compares_with_the_configured_interval():
    events, _ = chaos_run()
    events.append(ev(12.1, "trainer_start", "i0", command=["torchrun", "-m", "t", "--checkpoint.interval", "6"]))
    a = summarize(events)["advice"]
    assert a["current_interval_steps"] == 6 and "now every 6 steps" in a["message"]
    events.append(ev(40, "resume", "i2", step=12, checkpoint_interval=9, interval_source="auto"))
    assert summarize(events)["advice"]["current_interval_steps"] == 9  # the newest incarnation's


def test_young_daly_in_steps_clamped():
    c = interval.choose(2.0, 3600.0, 0.5, 10, 1000, interruptions=3)
    assert c.steps == round(math.sqrt(2 * 2.0 * 3600) / 0.5) == 240
    assert "Young/Daly 120 s" in c.reason and "MTBF 3600 s over 3" in c.reason
    assert interval.choose(2.0, 3600.0, 0.5, 10, 100).steps == 100
    assert "clamped to [10, 100]" in interval.choose(2.0, 3600.0, 0.5, 10, 100).reason
    assert interval.choose(2.0, 1.0, 0.5, 10, 100).steps == 10
    first = interval.choose(None, None, None, 5, 50)
    assert first.steps == 5 and "low end" in first.reason
    with pytest.raises(ValueError):
        interval.choose(1, 1, 1, 5, 4)


def test_auto_interval_from_a_ledger():
    events, _ = chaos_run()
    r = summarize(events)
    held = r["wall_s"] - r["breakdown"]["queue_s"] - r["breakdown"]["provisioning_s"]
    c = interval.from_ledger(events, 1, 10_000)
    # one work-losing interruption (the kill); the notice saved everything and does not count
    assert c.mtbf_s == pytest.approx(held) and c.save_cost_s == pytest.approx(0.75)
    assert c.steps == round(math.sqrt(2 * 0.75 * held) / r["steps"]["mean_step_s"])
    assert c.fields()["checkpoint_interval"] == c.steps and c.fields()["interval_source"] == "auto"
    assert interval.from_ledger([], 3, 30).steps == 3


def test_auto_interval_for_a_stored_run(tmp_path):
    events, _ = chaos_run()
    url = tmp_path / "_ledger"
    assert interval.for_run(str(url), 4, 40).steps == 4  # first start: nothing recorded yet
    (url / "all").mkdir(parents=True)  # the journal's layout: <ledger>/<incarnation>/<writer>.<token>.<segment>.jsonl
    (url / "all" / "replay.0.00000.jsonl").write_text("".join(e.to_line() + "\n" for e in events))
    assert interval.for_run(str(url), 1, 10_000).steps == interval.from_ledger(events, 1, 10_000).steps


def test_node_wrapper_passes_the_auto_interval(tmp_path):
    """The wrapper's plan (what `supervise node --dry-run` prints) with --checkpoint-interval-auto."""
    from supervisor.contract.node import Auto, NodeOptions
    from supervisor.node.wrapper import make_plan

    events, _ = chaos_run()
    ckpt = tmp_path / "ck"
    (ckpt / "_ledger" / "all").mkdir(parents=True)
    (ckpt / "_ledger" / "all" / "replay.0.00000.jsonl").write_text("".join(e.to_line() + "\n" for e in events))
    args = ["--module", "llama3", "--config", "llama3_debugmodel", "--training.steps", "10"]
    plan = make_plan(NodeOptions(checkpoints=str(ckpt), interval=Auto(2, 50)), args, environ={})
    expected = interval.from_ledger(events, 2, 50)
    i = plan.command.index("--checkpoint.interval")
    assert plan.command[i + 1] == str(expected.steps)
    assert f"checkpoint.interval {expected.reason}" in plan.describe()
    assert plan.interval.fields()["checkpoint_interval"] == expected.steps


def test_a_saved_notice_loses_nothing_even_with_a_gap_between_save_and_commit():
    """The seed-7 demo: the trainer saved step 6 on notice, the commit began 3.6 s after the save
    (waiting for the background committer); the restart resumed 6. Nothing was recomputed."""
    events = [ev(0, "launch"), ev(0, "node_start")]
    body, t = steps("i0", 0.0, 1, 6, ckpt_every=3, save_s=0.5)
    body = [e for e in body if not (e.kind == "checkpoint_saved" and e.get("step") == 6)]
    events += body + [ev(t - 0.2, "notice", "i0", source="aws", deadline=None),
                      ev(t + 1.0, "checkpoint_saved", "i0", step=6, duration_s=1.0),
                      ev(t + 5.1, "checkpoint_committed", "i0", step=6, duration_s=0.5),
                      ev(t + 5.2, "preempted", "i0", with_notice=True, saved_step=6),
                      ev(t + 5.3, "exit", "i0", code=75), ev(t + 6, "recovery_started", "c", "c"),
                      ev(t + 7, "node_start", "i1"), ev(t + 7.1, "resume", "i1", step=6)]
    body, t = steps("i1", t + 8, 7, 9)
    events += body + [ev(t + 0.1, "job_finished", state="SUCCEEDED")]
    r = summarize(events)
    ep = r["interruptions"][0]
    assert ep["cause"] == "notice" and ep["saved_step"] == 6
    assert r["lost_s"] == 0 and ep["lost_s"] == 0 and r["steps"]["recomputed"] == 0
    assert r["checkpoint_s"] == pytest.approx(0.5 + 5.6)  # step 3: save; step 6: done -> saved, waited, committed
