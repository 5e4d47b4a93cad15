"""Watchdog and exit-code decisions: pure functions of what the wrapper observed."""

from supervisor.contract.exitcodes import ExitCode
from supervisor.node.notices import Notice
from supervisor.node.watchdog import Watchdog
from supervisor.node.wrapper import exit_decision


def test_watchdog_startup_grace_then_progress_deadline():
    dog = Watchdog(hang_timeout_s=10, startup_timeout_s=100, now=0)
    assert dog.observe({}, 50) is None
    assert "heartbeat" in Watchdog(hang_timeout_s=10, startup_timeout_s=100, now=0).observe({}, 101)
    assert dog.observe({0: 1, 1: 1}, 60) is None
    assert dog.observe({0: 2, 1: 1}, 69) is None  # one rank advancing is progress
    assert dog.observe({0: 2, 1: 1}, 78) is None
    reason = dog.observe({0: 2, 1: 1}, 80)
    assert "no rank advanced for 10 s" in reason and "rank 0 at step 2" in reason


def test_exit_codes():
    notice = Notice("sigterm", 0.0, None)
    assert exit_decision({"outcome": "finished", "step": 9}, 0, None, None)[0] == ExitCode.FINISHED
    assert exit_decision({"outcome": "preempted_saved", "step": 5}, 1, notice, None)[0] == ExitCode.PREEMPTED_SAVED
    assert exit_decision({"outcome": "preempted_unsaved", "step": 5}, 1, notice, None)[0] == ExitCode.RETRYABLE
    assert exit_decision(None, None, notice, None)[0] == ExitCode.RETRYABLE
    assert exit_decision(None, 0, notice, None)[0] == ExitCode.RETRYABLE  # no outcome: no promise of a save
    assert exit_decision(None, None, None, "hang: ...")[0] == ExitCode.RETRYABLE
    assert exit_decision(None, 1, None, None)[0] == ExitCode.RETRYABLE
    assert exit_decision(None, 0, None, None)[0] == ExitCode.FINISHED


def _ev(kind, step, duration_s, writer="node0-rank0", incarnation="i1"):
    import time

    from supervisor.ledger.events import Event

    return Event(kind=kind, t=time.time(), time="", writer=writer, incarnation=incarnation,
                 fields={"step": step, "duration_s": duration_s})


def test_a_save_without_deadline_is_awaited_as_long_as_the_measured_save_needs():
    from supervisor.node.notices import SAVE_WAIT_FACTOR, SAVE_WAIT_SLACK_S, SaveWait, measured_save_s, save_wait_s

    saves = [_ev("checkpoint_saved", 5, 40.0), _ev("checkpoint_committed", 5, 2.0),
             _ev("checkpoint_saved", 10, 500.0), _ev("checkpoint_committed", 10, 100.0),  # a throttled store
             _ev("checkpoint_saved", 10, 7.0, incarnation="i0")]  # another start's save of the same step
    assert measured_save_s([]) is None
    assert measured_save_s(saves) == 600.0  # save + commit of one step, the longest one
    # measured: the factor over it, never under the floor -- and not a fixed 900 s either way
    assert save_wait_s(300, 600.0, 1800) == SAVE_WAIT_FACTOR * 600 + SAVE_WAIT_SLACK_S > 900
    assert save_wait_s(300, 1.0, 1800) == 300
    assert save_wait_s(300, None, 1800) == 1800  # nothing measured: as long as a silent trainer may be
    wait = SaveWait(floor_s=300, unmeasured_s=1800, now=1000.0)
    assert wait.give_up_at == 1000 + 1800
    assert not wait.observe(saves[:2], now=1001.0)  # what the ledger held at the notice is no progress
    assert wait.give_up_at == 1000 + 300  # 3 x 42 + 60 < the floor
    assert wait.observe(saves[:3], now=1200.0)  # the stop's save finished: its commit gets the whole wait again
    assert wait.give_up_at == 1200 + SAVE_WAIT_FACTOR * 500 + SAVE_WAIT_SLACK_S
    assert not wait.observe(saves[:3], now=1300.0) and wait.give_up_at == 1200 + 1560
    assert "measured save + commit 500.0 s" in wait.describe()
    # an async save blocks the loop briefly; its upload is what a stop waits for
    upload = [_ev("checkpoint_saved", 15, 3.0), _ev("checkpoint_uploaded", 15, 900.0), _ev("checkpoint_committed", 15, 1.0)]
    assert measured_save_s(upload) == 901.0
    assert wait.observe(saves[:3] + upload[:2], now=1400.0)  # the upload landing is progress too


def test_a_stop_exit_says_what_was_saved_and_why_not():
    from supervisor.node.wrapper import saved_step

    stop = Notice("stop", 0.0, None)
    assert exit_decision({"outcome": "preempted_saved", "step": 7}, 0, stop, None) == (
        ExitCode.FINISHED, "stopped on request; state saved and committed at step 7")
    unsaved = {"outcome": "preempted_unsaved", "step": 5, "reason": "saved step 8 but could not commit it"}
    assert exit_decision(unsaved, 0, stop, None) == (
        ExitCode.FINISHED, "stopped on request; not saved: saved step 8 but could not commit it")
    gave_up = "the trainer did not finish saving in time (measured save + commit 3.0 s: waiting up to 300 s)"
    assert exit_decision(None, None, stop, gave_up) == (ExitCode.FINISHED, f"stopped on request; not saved: {gave_up}")
    # a preemption the wrapper gave up on still recovers, with the reason
    assert exit_decision(None, None, Notice("sigterm", 0.0, None), gave_up) == (ExitCode.RETRYABLE, gave_up)
    assert saved_step({"outcome": "preempted_saved", "step": 7}) == 7
    assert saved_step(unsaved) is None and saved_step(None) is None


# -- the phases of wrapper.run, without processes ------------------------------------


def _plan(node_rank=1):
    from supervisor.node.resume import ResumePlan
    from supervisor.node.torchrun import Topology
    from supervisor.node.wrapper import Plan

    topo = Topology(nnodes=2, nproc_per_node=4, node_rank=node_rank, master_addr="10.0.0.1", master_port=8008,
                    accelerator="gpu")
    return Plan(topo, ResumePlan("s3://b/run", 20, "resuming from verified step 20"), ["torchrun", "-m", "x"], {})


def test_prestart_events_say_where_the_start_resumes_and_its_interval():
    from supervisor.node.wrapper import start_events

    events = dict(start_events(_plan(), ["--checkpoint.interval", "50"], pid=42, overhead_s=0.5, host="h1"))
    assert list(events) == ["node_start", "resume", "trainer_start"]
    assert events["node_start"] == {"node_rank": 1, "num_nodes": 2, "nproc_per_node": 4, "host": "h1", "accelerator": "gpu"}
    assert events["resume"]["step"] == 20 and events["resume"]["checkpoint_interval"] == 50
    assert events["resume"]["interval_source"] == "args"
    assert events["trainer_start"] == {"command": ["torchrun", "-m", "x"], "pid": 42, "world_size": 8,
                                       "wrapper_overhead_s": 0.5}


def test_watch_waits_for_a_save_until_the_deadline_or_as_long_as_saves_need():
    from supervisor.node.notices import STOP
    from supervisor.node.wrapper import gave_up_reason, notice_wait

    at, wait, line = notice_wait(Notice("aws", 990.0, 1030.0), now=100.0, grace_s=300, unmeasured_s=1800, wall=1000.0)
    assert (at, wait) == (130.0, None) and "preemption notice from aws" in line and "up to 30 s" in line
    at, wait, _ = notice_wait(Notice("aws", 990.0, 995.0), now=100.0, grace_s=300, unmeasured_s=1800, wall=1000.0)
    assert at == 100.0  # the deadline has passed: no wait
    at, wait, line = notice_wait(Notice(STOP, 990.0, None), now=100.0, grace_s=300, unmeasured_s=1800, wall=1000.0)
    assert wait is not None and at == wait.give_up_at == 1900.0 and line.startswith("stop request")
    assert "no deadline" in line
    assert "second Ctrl-C" in gave_up_reason(True, wait)
    assert "did not finish saving in time" in gave_up_reason(False, wait)
    assert "before the notice's deadline" in gave_up_reason(False, None)


def test_finish_events_tell_a_preemption_from_a_stop():
    from supervisor.node.notices import STOP
    from supervisor.node.wrapper import exit_events

    saved = {"outcome": "preempted_saved", "step": 30}
    events = exit_events(saved, ExitCode.PREEMPTED_SAVED, "preempted", Notice("sigterm", 0.0, None))
    assert events == [("preempted", {"with_notice": True, "saved_step": 30}),
                      ("exit", {"code": 75, "reason": "preempted", "notice": "sigterm", "saved_step": 30})]
    unsaved = exit_events({"outcome": "preempted_unsaved", "step": 20}, ExitCode.RETRYABLE, "r", Notice("gcp", 0.0, None))
    assert unsaved[0] == ("preempted", {"with_notice": True, "saved_step": None})
    stopped = exit_events(saved, ExitCode.FINISHED, "stopped", Notice(STOP, 0.0, None))
    assert [kind for kind, _ in stopped] == ["exit"] and stopped[0][1]["saved_step"] == 30
    assert exit_events(None, 69, "crash", None) == [("exit", {"code": 69, "reason": "crash", "notice": None,
                                                             "saved_step": None})]


class _ExitedTorchrun:
    """Stands in for the prestarted torchrun (supervisor.node.prestarted), so that the
    phases run without processes: it takes its command on stdin and has exited 0."""

    pid = 4242

    def __init__(self):
        import io

        self.stdin = io.BytesIO()

    def wait(self, timeout=None):
        return 0


def test_prestart_watch_finish_of_a_start_whose_trainer_finished(tmp_path, monkeypatch):
    from supervisor.contract.layout import ledger_url
    from supervisor.contract.node import NodeOptions
    from supervisor.ledger.journal import read_events
    from supervisor.node import wrapper
    from supervisor.contract.runtime import OUTCOME_FILE, write_json_atomic

    monkeypatch.delenv("SUPERVISE_INCARNATION", raising=False)
    # stop_everything kills every descendant of this process: on a node that is the
    # start's own; here it would be pytest's session servers (the S3 store). The start
    # began no process of its own (the torchrun stands in), so the kill is only recorded.
    kills: list[float] = []
    monkeypatch.setattr(wrapper.process, "kill_all", lambda grace_s=5.0: kills.append(grace_s) or [])
    url = str(tmp_path / "ckpt")
    opts = NodeOptions(checkpoints=url, run_dir=str(tmp_path / "run"), cloud="none")
    args = ["--module", "llama3", "--config", "llama3_debugmodel", "--training.steps", "10"]
    plan = wrapper.make_plan(opts, args, environ={})
    record = wrapper._Record(plan.catalog, args, plan.resume.step, "inc-1", writer=True)  # budget
    record.data["args_ok"] = wrapper._titan_version()  # TorchTitan's parser accepted these args at an earlier start
    start = wrapper._Start(opts, args, plan, record, "inc-1", started_at=0.0)
    try:
        start.watch(start.prestart(_ExitedTorchrun(), t0=0.0))
        write_json_atomic(start.run_dir / OUTCOME_FILE, {"outcome": "finished", "step": 10})
    finally:
        start.stop_everything()
    assert start.rc == 0 and start.stop is None and start.hang is None and kills == [5.0]
    assert start.finish() == ExitCode.FINISHED
    kinds = [e.kind for e in read_events(ledger_url(url))[0]]
    assert kinds == ["node_start", "resume", "trainer_start", "exit"]
    (incarnation,) = record.io.load()["incarnations"]
    assert incarnation["code"] == ExitCode.FINISHED


def test_process_exit_leaves_a_multi_node_recoverable_end_to_the_head():
    from supervisor.contract.exitcodes import process_exit

    saved, retry, user = ExitCode.PREEMPTED_SAVED, ExitCode.RETRYABLE, ExitCode.USER_ERROR
    assert [process_exit(saved, r, 2) for r in (0, 1)] == [saved, ExitCode.FINISHED]
    assert [process_exit(retry, r, 3) for r in (0, 1, 2)] == [retry, ExitCode.FINISHED, ExitCode.FINISHED]
    assert process_exit(saved, 0, 1) == saved and process_exit(user, 1, 2) == user  # a config error fails the job
    assert process_exit(ExitCode.FINISHED, 1, 2) == ExitCode.FINISHED


def test_a_two_node_saved_notice_exits_0_on_node_1_then_75_on_the_head(tmp_path, monkeypatch):
    """Slurm's srun reports one code for all nodes (supervisor.contract.exitcodes.process_exit):
    node 1 records 75 in the ledger and exits 0; the head waits for node 1's exit event, then exits 75."""
    from supervisor.contract.layout import ledger_url
    from supervisor.contract.node import NodeOptions
    from supervisor.contract.runtime import OUTCOME_FILE, write_json_atomic
    from supervisor.ledger.journal import read_events
    from supervisor.node import wrapper

    monkeypatch.delenv("SUPERVISE_INCARNATION", raising=False)
    monkeypatch.setattr(wrapper.process, "kill_all", lambda grace_s=5.0: [])  # see the test above
    monkeypatch.setattr(wrapper, "PEER_EXIT_MARGIN_S", 0.0)
    url = str(tmp_path / "ckpt")
    args = ["--module", "llama3", "--config", "llama3_debugmodel", "--training.steps", "10"]
    codes = {}
    for rank in (1, 0):  # node 1 first: the head waits for its exit event
        opts = NodeOptions(checkpoints=url, run_dir=str(tmp_path / f"run{rank}"), cloud="none")
        env = {"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NODE_IPS": "10.0.0.1\n10.0.0.2"}
        plan = wrapper.make_plan(opts, args, environ=env)
        record = wrapper._Record(plan.catalog, args, plan.resume.step, f"inc-{rank}", writer=rank == 0)
        record.data["args_ok"] = wrapper._titan_version()
        start = wrapper._Start(opts, args, plan, record, f"inc-{rank}", started_at=0.0)
        try:
            if rank == 1:  # the notice is node 1's only; node 0 saves at the same step, as its ranks agree
                start._on_notice(Notice("sigterm", 1.0, None))
            start.watch(start.prestart(_ExitedTorchrun(), t0=0.0))
            write_json_atomic(start.run_dir / OUTCOME_FILE, {"outcome": "preempted_saved", "step": 7})
        finally:
            start.stop_everything()
        codes[rank] = start.finish()
    assert codes == {1: ExitCode.FINISHED, 0: ExitCode.PREEMPTED_SAVED}
    exits = {e.writer: (e.get("code"), e.get("saved_step")) for e in read_events(ledger_url(url))[0] if e.kind == "exit"}
    assert exits == {"node1": (ExitCode.PREEMPTED_SAVED, 7), "node0": (ExitCode.PREEMPTED_SAVED, 7)}
