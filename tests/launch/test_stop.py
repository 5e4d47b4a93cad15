"""`supervise stop` on a SkyPilot job saves first: a stop request in the bucket
(real S3: SeaweedFS) that a real `supervise node` polls as a notice, the node's
exit in the run ledger, then the cancel; on a local job the same way (the emulator
stops the cloud's way).
The request has no deadline and nothing waits a fixed budget: the save is awaited
as long as this run's measured saves need, and `stop` prints the step committed
at the stop, or "not saved: <why>" with exit 1.

Stand-ins: the trainer is tests/node/standin_trainer.py (it keeps the wrapper's
runtime contract and, with STANDIN_SAVE_EVERY, saves a real DCP checkpoint through
the store and commits it with the catalog, recording its measured durations in the
ledger), and the SkyPilot API server (none runs here) is replaced at the SDK
boundary: `_queue` answers RUNNING (SkyPilot still runs its end-of-job flush after
our command exits) and `sky.jobs.cancel` records its arguments. The store is
throttled by a loopback proxy (tests/store/tcp_proxy.py) in front of SeaweedFS.
"""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from supervisor import registry
from supervisor.launch import skypilot
from supervisor.launch.local_controller import free_port
from supervisor.ledger.events import Event
from supervisor.ledger.journal import read_events
from supervisor.node.notices import NoticeWatcher
from supervisor.node.wrapper import exit_decision
from supervisor.contract.layout import ledger_url, stop_request_url
from supervisor.store.catalog import Catalog
from tests.node.nodeproc import cleanup, start_node, wait_for
from tests.store.tcp_proxy import FaultProxy

TRAINER = ["--module", "llama3", "--config", "llama3_debugmodel", "--training.steps", "100000"]
GRACE_S = 1.0  # the node's --grace: a fixed wait after a notice without deadline, far shorter than a save here
SAVE_BYTES = 4 << 20  # through a proxy that sleeps DELAY_S per chunk of at most 64 KiB: >= 64 x DELAY_S per save
DELAY_S = 0.05


def _event(kind, writer, incarnation, **fields):
    return Event(kind=kind, t=time.time(), time="", writer=writer, incarnation=incarnation, fields=fields)


def test_nodes_exited_needs_every_node_of_its_latest_start():
    two = [_event("node_start", "node0", "a", num_nodes=2), _event("node_start", "node1", "b", num_nodes=2)]
    assert not skypilot.nodes_exited([])
    assert not skypilot.nodes_exited(two + [_event("exit", "node0", "a", code=0)])
    assert skypilot.nodes_exited(two + [_event("exit", "node0", "a", code=0), _event("exit", "node1", "b", code=0)])
    # an exit of an earlier start (before a recovery) does not count for the new one
    again = two + [_event("exit", "node0", "a", code=69), _event("exit", "node1", "b", code=69),
                   _event("node_start", "node0", "c", num_nodes=2), _event("node_start", "node1", "d", num_nodes=2)]
    assert not skypilot.nodes_exited(again)


def test_a_stop_notice_ends_the_job_with_0_saved_or_not():
    from supervisor.node.notices import Notice

    stop = Notice("stop", time.time(), None)
    assert exit_decision({"outcome": "preempted_saved", "step": 7}, 0, stop, None)[0] == 0
    assert "saved and committed at step 7" in exit_decision({"outcome": "preempted_saved", "step": 7}, 0, stop, None)[1]
    assert exit_decision(None, 1, stop, None) == (0, "stopped on request; no save reported")
    sigterm = Notice("sigterm", time.time(), None)  # a preemption still recovers
    assert exit_decision({"outcome": "preempted_saved", "step": 7}, 0, sigterm, None)[0] == 75


def test_watcher_sees_the_stop_request_in_the_bucket(s3_url):
    got = []
    watcher = NoticeWatcher(got.append, cloud="none", poll_s=0.2, stop_url=stop_request_url(s3_url))
    watcher.start()
    try:
        time.sleep(0.5)
        assert not got  # nothing requested yet
        skypilot.write_stop_request(s3_url)
        wait_for(lambda: got, 30)
    finally:
        watcher.stop()
    assert got[0].source == "stop" and got[0].deadline is None  # no cloud deadline: the trainer always saves
    from supervisor.store.fs import Store

    body = json.loads(Store(f"{s3_url}/_supervise").cat("stop.json"))
    assert "deadline_s" not in body and "deadline" not in body
    skypilot.clear_stop_request(s3_url)
    skypilot.clear_stop_request(s3_url)  # idempotent


def test_a_stop_request_never_carries_a_deadline_so_the_trainer_always_saves(s3_url):
    from supervisor.store.fs import Store
    from supervisor.titan.policy import notice_plan

    # an older `supervise stop` wrote a fixed budget; the wrapper ignores it
    Store(f"{s3_url}/_supervise").put(json.dumps({"deadline_s": 900, "by": "supervise stop"}).encode(), "stop.json")
    notice = NoticeWatcher(lambda n: None, cloud="none", stop_url=stop_request_url(s3_url))._check_stop()
    assert notice.source == "stop" and notice.deadline is None
    # the old path: 900 s from the request, and a save measured longer than that was skipped
    assert not notice_plan(time.time(), time.time() + 900, 1000.0).save
    assert notice_plan(time.time(), notice.deadline, 1000.0).save  # the new one saves whatever the measurement


class _Catalog:
    def __init__(self, states):
        self.states = states

    def inspect(self, step):
        from supervisor.store.catalog import StepInfo

        state, reason = self.states.get(step, ("incomplete", "empty or missing folder"))
        return StepInfo(step, f"mem://step-{step}", state, reason)


def test_stop_result_is_the_step_the_nodes_committed_checked_against_the_catalog():
    start = [_event("node_start", "node0", "a", num_nodes=2), _event("node_start", "node1", "b", num_nodes=2)]
    saved = start + [_event("exit", "node0", "a", code=0, saved_step=12, notice="stop",
                            reason="stopped on request; state saved and committed at step 12"),
                     _event("exit", "node1", "b", code=0, saved_step=12, notice="stop",
                            reason="stopped on request; state saved and committed at step 12")]
    ok = skypilot.stop_result("j", saved, None, catalog=_Catalog({12: ("committed", "")}))
    assert (ok.saved, ok.step, ok.line()) == (True, 12, "saved and committed step 12")
    assert ok.as_json() == {"name": "j", "saved": True, "step": 12, "reason": ok.reason}
    # the nodes' word alone is not enough: the catalog must have the commit
    gone = skypilot.stop_result("j", saved, None, catalog=_Catalog({}))
    assert not gone.saved and gone.line().startswith("not saved: the nodes reported step 12 saved, but the catalog")
    # an older wrapper's exit (no saved_step): the step its reason names; a local job's SIGTERM exits 75
    old = start[:1] + [_event("exit", "node0", "a", code=75, reason="preempted; state saved and committed at step 9")]
    assert skypilot.stop_outcome(old) == (9, "")
    unsaved = start + [_event("exit", "node0", "a", code=0, notice="stop",
                              reason="stopped on request; not saved: saved step 8 but could not commit it")]
    res = skypilot.stop_result("j", unsaved, None, catalog=_Catalog({}), waited_out="the nodes did not finish saving")
    assert res.line() == "not saved: the nodes did not finish saving"  # node1 never exited
    res = skypilot.stop_result("j", unsaved + [_event("exit", "node1", "b", code=0, reason="stopped on request; "
                               "not saved: saved step 8 but could not commit it")], None, catalog=_Catalog({}))
    assert res.line() == "not saved: saved step 8 but could not commit it"
    assert skypilot.stop_outcome(start) == (None, "no node reported its exit in the run ledger")


def _node_args(s3_url, tmp_path):
    return ["--checkpoints", s3_url, "--trainer-module", "tests.node.standin_trainer", "--nproc-per-node", "1",
            "--cloud", "none", "--notice-poll", "0.5", "--grace", str(GRACE_S), "--master-port", str(free_port()),
            "--run-dir", str(tmp_path / "run")]


def _fake_skypilot(monkeypatch, tmp_path, s3_url, name="stop-me"):
    """The registry entry of a running managed job; SkyPilot's API at the SDK boundary."""
    import sky

    monkeypatch.setenv("SUPERVISE_HOME", str(tmp_path / "home"))
    registry.record(name, backend="skypilot", checkpoints_url=s3_url, job_id="9")
    calls = []
    monkeypatch.setattr(skypilot, "_queue", lambda: [{"job_id": 9, "job_name": name, "status": "RUNNING"}])
    monkeypatch.setattr(sky.jobs, "cancel", lambda **kw: calls.append(
        (kw, skypilot.nodes_exited(read_events(ledger_url(s3_url))[0]))))
    monkeypatch.setattr(skypilot, "STOP_POLL_S", 0.5)
    monkeypatch.setattr(sky, "stream_and_get", lambda request: request)  # no API server may be started
    return calls


def _stop(*args):
    from supervisor.cli import app

    return CliRunner().invoke(app, ["stop", *args])


def _saves(events, kind):
    return {e.get("step"): e.get("duration_s") for e in events if e.kind == kind}


@pytest.mark.slow
def test_stop_asks_the_node_to_save_waits_for_its_exit_then_cancels(s3_store, s3_url, tmp_path, monkeypatch):
    """Throttled store: every save takes longer than the node's fixed --grace (the old
    wait after a notice without deadline), yet the stop's save is awaited, committed,
    and `stop` names its step."""
    calls = _fake_skypilot(monkeypatch, tmp_path, s3_url)
    log = tmp_path / "node.log"
    with FaultProxy(s3_store.ports["s3"]) as proxy:
        proxy.delay_s = DELAY_S
        env = {"STANDIN_SAVE_EVERY": "4", "STANDIN_SAVE_BYTES": str(SAVE_BYTES), "STANDIN_STORE_ENDPOINT": proxy.endpoint}
        node = start_node(_node_args(s3_url, tmp_path), TRAINER, env=env, log=log)
        try:
            # a periodic save measured first: the wait for the stop's save follows it
            wait_for(lambda: _saves(read_events(ledger_url(s3_url))[0], "checkpoint_committed"), 180, interval=0.5)
            res = _stop("stop-me")
            code = node.wait(60)
        finally:
            cleanup(node)
    text = log.read_text(errors="replace")
    assert code == 0, text  # not 75: SkyPilot must not recover a stopped job
    events = read_events(ledger_url(s3_url))[0]
    (exit_event,) = [e for e in events if e.kind == "exit"]
    step = exit_event.get("saved_step")
    assert res.exit_code == 0, res.output
    assert f"stopped stop-me: saved and committed step {step}\n" in res.output
    assert Catalog(s3_url).latest().step == step and Catalog(s3_url).inspect(step).state == "committed"
    assert f"stopped on request; state saved and committed at step {step}" in text
    assert exit_event.get("notice") == "stop"
    # the stop's own save: through the throttled store it took longer than the fixed wait
    assert _saves(events, "checkpoint_saved")[step] > GRACE_S and step in _saves(events, "checkpoint_committed")
    assert "measured save + commit" in text  # the wrapper waited on the measurement, not on --grace
    assert [(e.get("source"), e.get("deadline")) for e in events if e.kind == "notice"] == [("stop", None)]
    assert not any(e.kind == "preempted" for e in events)
    (kw, exited), = calls
    assert kw == {"job_ids": [9]} and exited  # cancelled once the node reported its exit, not before
    from supervisor.store.fs import Store

    assert "stop.json" not in Store(f"{s3_url}/_supervise").listdir()  # the next start is not stopped


@pytest.mark.slow
def test_a_stop_that_could_not_save_says_why_and_exits_1(s3_store, s3_url, tmp_path, monkeypatch):
    calls = _fake_skypilot(monkeypatch, tmp_path, s3_url, name="no-save")
    log = tmp_path / "node.log"
    with FaultProxy(s3_store.ports["s3"]) as proxy:
        proxy.deny(rb"PUT [^ ]*_COMMIT\.json")  # a bucket policy that forbids the commit marker
        env = {"STANDIN_SAVE_EVERY": "0", "STANDIN_STORE_ENDPOINT": proxy.endpoint}
        node = start_node(_node_args(s3_url, tmp_path), TRAINER, env=env, log=log)
        try:
            wait_for(lambda: (tmp_path / "run" / "heartbeat" / "rank-0.json").exists(), 180, interval=0.5)
            res = _stop("no-save", "--json")
            code = node.wait(60)
        finally:
            cleanup(node)
    text = log.read_text(errors="replace")
    assert code == 0, text  # the job is over either way: not recovered
    assert res.exit_code == 1, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["name"] == "no-save" and out["saved"] is False and out["step"] is None
    assert "could not commit it" in out["reason"]
    assert "stopped on request; not saved: saved step" in text
    catalog = Catalog(s3_url)
    assert catalog.steps() and not any(catalog.inspect(s).state == "committed" for s in catalog.steps())
    assert len(calls) == 1  # still cancelled


def test_stop_now_and_stop_of_a_job_not_running_cancel_at_once(monkeypatch, tmp_path):
    import sky

    monkeypatch.setenv("SUPERVISE_HOME", str(tmp_path / "home"))
    registry.record("j", backend="skypilot", checkpoints_url="s3://my-ckpts/supervise/j", job_id="4")
    calls = []
    monkeypatch.setattr(sky.jobs, "cancel", lambda **kw: calls.append(kw))
    monkeypatch.setattr(sky, "stream_and_get", lambda request: request)  # no API server may be started
    monkeypatch.setattr(skypilot, "clear_stop_request", lambda url: None)
    monkeypatch.setattr(skypilot, "write_stop_request", lambda url, **kw: calls.append("stop request"))
    for state in ("RUNNING", "RECOVERING"):  # --now; and a job with no node to save (being recovered)
        monkeypatch.setattr(skypilot, "_queue", lambda state=state: [{"job_id": 4, "job_name": "j", "status": state}])
        skypilot.SkyPilotBackend().cancel("j", graceful=state != "RUNNING")
    assert calls == [{"job_ids": [4]}, {"job_ids": [4]}]
