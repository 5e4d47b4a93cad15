"""The one merged ledger (ledger.merged): node losses nobody wrote down, and the newest
run of a name started again. Hand-built ledgers in the shapes the backends leave:
on SkyPilot every node wrapper labels its own incarnation and nobody writes the
loss of a node; the emulator shares one label per incarnation and writes `preempted`."""

from __future__ import annotations

from dataclasses import replace

import pytest

from supervisor.ledger.merged import USER_JOB_FAILURE, lost_nodes, merge, newest_run
from supervisor.ledger.skypilot import to_events
from supervisor.ledger.timeline import summarize
from tests.ledger.runs import T0, ev, steps


def test_our_user_job_failure_code_is_skypilots():
    from sky.jobs import state

    assert state.USER_JOB_FAILURE_EVENT_CODE == USER_JOB_FAILURE


def _two_nodes(inc: str, t: float, first: int, last: int) -> tuple[list, float]:
    """Both wrappers start (each its own label, as on SkyPilot), rank 0's trainer steps."""
    out = [ev(t, "node_start", f"{inc}-a", "node0", node_rank=0, num_nodes=2),
           ev(t + 0.1, "node_start", f"{inc}-b", "node1", node_rank=1, num_nodes=2),
           ev(t + 0.5, "resume", f"{inc}-a", "node0", step=first - 1), ev(t + 0.5, "resume", f"{inc}-b", "node1",
                                                                          step=first - 1)]
    body, end = steps(f"{inc}-a", t + 1, first, last, ckpt_every=5, save_s=0.2, commit_s=0.1)
    return out + [replace(e, writer="node0-rank0") for e in body], end


def _sky_rows(*transitions: tuple[float, str, str | None]) -> list[dict]:
    """SkyPilot's /jobs/events rows (naive UTC here: the record's times anchor them)."""
    from datetime import datetime, timezone

    return [{"new_status": s, "timestamp": datetime.fromtimestamp(T0 + t, timezone.utc).replace(tzinfo=None).isoformat(),
             "reason": "Cluster preempted or failed, recovering" if s == "RECOVERING" and code is None else s,
             "code": code} for t, s, code in transitions]


def _skypilot_job(second_loss: str):
    """launch; a 2-node start lost without a word at ~step 7 (the cluster was lost); a second
    start that ends as `second_loss` says; a third start that finishes."""
    e = [ev(0, "launch", "0", "launcher", backend="skypilot", num_nodes=2, accelerators=None, spot=True)]
    a, t = _two_nodes("s1", 10, 1, 7)
    e += a
    lost_at = t
    b, t = _two_nodes("s2", t + 30, 6, 12)
    e += b
    if second_loss == "notice":  # node 1 got the notice; both saved step 12 and exited 75
        e += [ev(t + 0.1, "notice", "s2-b", "node1", source="sigterm")]
        for label, w in (("s2-a", "node0"), ("s2-b", "node1")):
            e += [ev(t + 1, "preempted", label, w, with_notice=True, saved_step=12),
                  ev(t + 1.1, "exit", label, w, code=75, saved_step=12)]
        code = USER_JOB_FAILURE  # exit 75 is in recover_on_exit_codes: the cluster stayed up
    else:  # node 1's trainer crashed: 69; its peer was taken down with it, silently
        e += [ev(t + 1, "exit", "s2-b", "node1", code=69, reason="torchrun failed")]
        code = USER_JOB_FAILURE
    second_at = t + 1.1
    c, t = _two_nodes("s3", t + 30, 13, 15)
    e += c + [ev(t + 0.1, "exit", "s3-a", "node0", code=0), ev(t + 0.1, "exit", "s3-b", "node1", code=0)]
    rows = _sky_rows((0.5, "PENDING", None), (2, "STARTING", None), (9, "RUNNING", None),
                     (lost_at + 10, "RECOVERING", None), (lost_at + 25, "RUNNING", None),
                     (second_at + 5, "RECOVERING", code), (second_at + 25, "RUNNING", None), (t + 5, "SUCCEEDED", None))
    record = {"job_id": 3, "status": "SUCCEEDED", "submitted_at": T0 + 0.5, "start_at": T0 + 9,
              "last_recovered_at": T0 + second_at + 25, "end_at": T0 + t + 5, "recovery_count": 2,
              "resources": "2x[CPU:4+][Spot]"}
    return e, to_events(record, rows)


def test_a_skypilot_node_lost_without_a_word_is_a_preemption_without_notice():
    journal, (backend, problems) = _skypilot_job("notice")
    assert not problems
    inferred = lost_nodes(journal + backend)
    # both nodes of the first start: neither reported an exit, each started again
    assert [(e.incarnation, e.get("with_notice")) for e in inferred] == [("s1-a", False), ("s1-b", False)]
    report = summarize(merge(journal, backend))
    assert [ep["cause"] for ep in report["interruptions"]] == ["no_notice", "notice"]
    assert report["preemptions"] == {"notice": 1, "no_notice": 1} and report["failures"] == 0
    assert report["recoveries"] == 2 and report["state"] == "SUCCEEDED"
    notice = report["interruptions"][1]
    assert notice["saved_step"] == notice["resumed_step"] == 12 and notice["lost_steps"] == 0
    # without SkyPilot's record (status, the node's `interval: auto`) the same causes
    assert [ep["cause"] for ep in summarize(merge(journal))["interruptions"]] == ["no_notice", "notice"]


def test_a_crash_that_takes_its_peer_down_stays_a_failure():
    journal, (backend, _) = _skypilot_job("crash")
    # the first start's silent loss is inferred; the second start's silent node 0 is explained by node 1's 69
    assert [e.incarnation for e in lost_nodes(journal + backend)] == ["s1-a", "s1-b"]
    report = summarize(merge(journal, backend))
    assert [ep["cause"] for ep in report["interruptions"]] == ["no_notice", "failure"]


@pytest.mark.parametrize("exit_after_s", [None, 12], ids=["before SkyPilot noticed", "after SkyPilot noticed"])
def test_skypilots_cluster_lost_row_outweighs_a_survivors_exit(exit_after_s):
    """Node 1 vanished; node 0, signalled as Slurm killed the job, managed to exit 69.
    SkyPilot's RECOVERING row without USER_JOB_FAILURE says the cluster was lost. On a
    loaded machine the survivor's exit lands after that row (seen on the Slurm e2e run:
    RECOVERING 29.5 s after the last step, the head's 69 at 31.8 s); it still explains
    the same loss."""
    journal, (backend, _) = _skypilot_job("notice")
    lost_at = max(e.t for e in journal if e.incarnation.startswith("s1")) - T0  # RECOVERING at +10
    t_exit = 20 if exit_after_s is None else lost_at + exit_after_s  # s1 ran 10 -> ~18, s2 starts ~48
    journal = journal + [ev(t_exit, "exit", "s1-a", "node0", code=69)]
    got = lost_nodes(journal + backend)
    assert "s1-b" in {e.incarnation for e in got} and "s1-a" not in {e.incarnation for e in got}
    assert [ep["cause"] for ep in summarize(merge(journal, backend))["interruptions"]][0] == "no_notice"


def test_the_emulators_own_preempted_is_not_doubled_and_the_last_start_is_not_judged():
    e = [ev(0, "launch", "0", "launcher", backend="local", num_nodes=2),
         ev(1, "node_start", "0", "node0", node_rank=0), ev(1, "node_start", "0", "node1", node_rank=1),
         ev(5, "preempted", "0", "controller", with_notice=False, node_rank=1),
         ev(6, "recovery_started", "0", "controller", reason="node 1 lost"),
         ev(8, "node_start", "1", "node0", node_rank=0), ev(8, "node_start", "1", "node1", node_rank=1)]
    assert lost_nodes(e) == []  # incarnation 0 has its preempted; incarnation 1 has no later start


def test_a_name_started_again_reports_its_newest_run_and_says_so():
    first, _ = _skypilot_job("notice")
    again = [ev(first[-1].t - T0 + 100, "launch", "0", "launcher", backend="skypilot", num_nodes=2)]
    a, t = _two_nodes("r2", first[-1].t - T0 + 110, 16, 20)
    events, run = newest_run(first + again + a + [ev(t + 1, "exit", "r2-a", "node0", code=0)])
    assert (run.index, run.count) == (2, 2) and run.launched_at == again[0].t
    assert min(e.t for e in events) == again[0].t and "run 2 of 2" in run.line()
    assert newest_run(first)[1].line() is None
