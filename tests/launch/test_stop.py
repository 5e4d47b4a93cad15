"""`supervise stop` on a SkyPilot job saves first: a stop request in the bucket
(real S3: SeaweedFS) that a real `supervise node` polls as a notice, the node's
exit in the run ledger, then the cancel.

Stand-ins: the trainer is tests/node/standin_trainer.py (it keeps the wrapper's
runtime contract: notice -> outcome "preempted_saved"), and the SkyPilot API
server (none runs here) is replaced at the SDK boundary: `_queue` answers
RUNNING (SkyPilot still runs its end-of-job flush after our command exits) and
`sky.jobs.cancel` records its arguments.
"""

from __future__ import annotations

import socket
import time

import pytest

from supervisor import registry
from supervisor.launch import skypilot
from supervisor.ledger.events import Event
from supervisor.ledger.journal import read_events
from supervisor.node.notices import NoticeWatcher
from supervisor.node.wrapper import exit_decision
from supervisor.runtime import ledger_url, stop_request_url
from tests.node.nodeproc import cleanup, start_node, wait_for

TRAINER = ["--module", "llama3", "--config", "llama3_debugmodel", "--training.steps", "100000"]


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
        skypilot.write_stop_request(s3_url, deadline_s=120)
        wait_for(lambda: got, 30)
    finally:
        watcher.stop()
    assert got[0].source == "stop" and got[0].deadline == pytest.approx(time.time() + 120, abs=30)
    skypilot.clear_stop_request(s3_url)
    skypilot.clear_stop_request(s3_url)  # idempotent


@pytest.mark.slow
def test_stop_asks_the_node_to_save_waits_for_its_exit_then_cancels(s3_url, tmp_path, monkeypatch):
    import sky

    monkeypatch.setenv("SUPERVISE_HOME", str(tmp_path / "home"))
    registry.record("stop-me", backend="skypilot", checkpoints_url=s3_url, job_id="9")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--checkpoints", s3_url, "--trainer-module", "tests.node.standin_trainer", "--nproc-per-node", "1",
            "--cloud", "none", "--notice-poll", "0.5", "--master-port", str(port), "--run-dir", str(tmp_path / "run")]
    log = tmp_path / "node.log"
    node = start_node(args, TRAINER, log=log)
    calls = []
    monkeypatch.setattr(skypilot, "_queue", lambda: [{"job_id": 9, "job_name": "stop-me", "status": "RUNNING"}])
    monkeypatch.setattr(sky.jobs, "cancel", lambda **kw: calls.append(
        (kw, skypilot.nodes_exited(read_events(ledger_url(s3_url))[0]))))
    monkeypatch.setattr(skypilot, "STOP_POLL_S", 0.5)
    monkeypatch.setattr(sky, "stream_and_get", lambda request: request)  # no API server may be started
    try:
        wait_for(lambda: any(e.kind == "trainer_start" for e in read_events(ledger_url(s3_url))[0]), 120)
        wait_for(lambda: (tmp_path / "run" / "heartbeat" / "rank-0.json").exists(), 60)
        skypilot.SkyPilotBackend().cancel("stop-me", graceful=True, timeout_s=120)
        code = node.wait(60)
    finally:
        cleanup(node)
    text = log.read_text(errors="replace")
    assert code == 0, text  # not 75: SkyPilot must not recover a stopped job
    assert "stopped on request; state saved and committed at step" in text
    (kw, exited), = calls
    assert kw == {"job_ids": [9]} and exited  # cancelled once the node reported its exit, not before
    events = read_events(ledger_url(s3_url))[0]
    assert [e.get("source") for e in events if e.kind == "notice"] == ["stop"]
    assert not any(e.kind == "preempted" for e in events)
    from supervisor.store.fs import Store

    assert "stop.json" not in Store(f"{s3_url}/_supervise").listdir()  # the next start is not stopped


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
