"""Process hygiene and the notice/watchdog paths through a real `supervise node`,
real torchrun and real signals, with a stand-in trainer (tests/node/standin_trainer.py)
so that these run in seconds; the same paths with real TorchTitan are in test_e2e.py."""

import json
import os
import signal

import psutil
import pytest

from supervisor.contract.exitcodes import ExitCode
from supervisor.launch.local_controller import free_port
from tests.node.nodeproc import cleanup, start_node, survivors, wait_for

pytestmark = pytest.mark.slow
TRAINER = ["--module", "llama3", "--config", "llama3_debugmodel"]


def _node(tmp_path, *extra, nproc=2, steps=1000, env=None):
    run_dir = tmp_path / "run"
    args = [
        "--checkpoints", str(tmp_path / "ck"), "--trainer-module", "tests.node.standin_trainer",
        "--nproc-per-node", str(nproc), "--run-dir", str(run_dir), "--cloud", "none",
        "--master-port", str(free_port()), *extra,
    ]  # fmt: skip
    proc = start_node(args, [*TRAINER, "--training.steps", str(steps)], env=env, log=tmp_path / "node.log")
    return proc, run_dir


def _pids(run_dir, n):
    return wait_for(lambda: [int((run_dir / f"pid-{r}").read_text()) for r in range(n)]
                    if all((run_dir / f"pid-{r}").exists() for r in range(n)) else None, 60)  # fmt: skip


def test_sigterm_is_a_notice_and_the_exit_is_preempted_saved(tmp_path):
    proc, run_dir = _node(tmp_path)
    try:
        _pids(run_dir, 2)
        wait_for(lambda: (run_dir / "heartbeat" / "rank-1.json").exists())
        os.killpg(proc.pid, signal.SIGTERM)  # what SkyPilot sends to the job's process group
        assert proc.wait(60) == ExitCode.PREEMPTED_SAVED
        notice = json.loads((run_dir / "notice.json").read_text())
        assert notice["source"] == "sigterm" and notice["deadline"] is None
        assert not survivors(proc.tag)
    finally:
        cleanup(proc)


def test_notice_file_and_finished_run(tmp_path):
    notice = tmp_path / "preempt-now"
    proc, run_dir = _node(tmp_path, "--notice-file", str(notice), nproc=1)
    try:
        wait_for(lambda: (run_dir / "heartbeat" / "rank-0.json").exists())
        notice.write_text("")
        assert proc.wait(60) == ExitCode.PREEMPTED_SAVED
        assert json.loads((run_dir / "notice.json").read_text())["source"] == "file"
    finally:
        cleanup(proc)
    proc, _ = _node(tmp_path, "--notice-file", str(notice), nproc=1, steps=5)
    try:
        assert proc.wait(60) == ExitCode.FINISHED  # the consumed file does not stop the restart
    finally:
        cleanup(proc)


def test_stopped_worker_is_a_hang_and_nothing_survives(tmp_path):
    proc, run_dir = _node(tmp_path, "--hang-timeout", "2")
    try:
        pids = _pids(run_dir, 2)
        wait_for(lambda: (run_dir / "heartbeat" / "rank-1.json").exists())
        for pid in pids:  # a stand-in rank does not block on its peer, so stop both
            os.kill(pid, signal.SIGSTOP)
        assert proc.wait(60) == ExitCode.RETRYABLE
        assert "hang" in (tmp_path / "node.log").read_text()
        assert not survivors(proc.tag)
    finally:
        cleanup(proc)


def test_dead_torchrun_leaves_no_orphan_workers(tmp_path):
    proc, run_dir = _node(tmp_path)
    try:
        workers = _pids(run_dir, 2)
        torchrun = psutil.Process(workers[0]).parent()
        torchrun.kill()  # workers live in their own sessions; torchrun's death does not stop them
        assert proc.wait(60) == ExitCode.RETRYABLE
        assert not survivors(proc.tag)
    finally:
        cleanup(proc)


def test_killed_wrapper_takes_torchrun_and_workers_with_it(tmp_path):
    proc, run_dir = _node(tmp_path)
    try:
        _pids(run_dir, 2)
        os.killpg(proc.pid, signal.SIGKILL)  # only the wrapper's group; torchrun is in its own session
        proc.wait(10)
        wait_for(lambda: not survivors(proc.tag), 60)
    finally:
        cleanup(proc)


def test_supervise_node_prestarts_torchrun_first_thing_except_for_dry_run_and_help():
    """supervisor.node.early: the torchrun that `supervise node` starts before its CLI
    imports; it waits for its command, and ends (exit 0) when none comes."""
    from supervisor.node import early

    for args in (["--dry-run", "--", *TRAINER], ["--help"]):
        early.prestart(args)
        assert early._early is None, args
    early.prestart(["--checkpoints", "/tmp/x", "--", *TRAINER, "--dry-run"])  # a trainer arg, not ours
    prestarted = early._early
    proc = early.take()
    assert proc is prestarted is not None and early._early is None, "taken once"
    later = early.take()  # none left: started now
    assert later is not proc
    for p in (proc, later):
        p.stdin.close()  # the wrapper decided not to run
        assert p.wait(60) == 0
