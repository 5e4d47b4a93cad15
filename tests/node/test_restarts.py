"""Restarts through a real `supervise node` against real SeaweedFS, with the stand-in
trainer (tests/node/standin_trainer.py) in place of TorchTitan's training loop: the
progress budget, TorchTitan's parser rejecting bad args, and a store outage at start.
Each `_start` is one incarnation, as a managed job would restart `run`."""

from __future__ import annotations

import json
import os
import signal
import time
import warnings

import pytest

from supervisor.contract.exitcodes import ExitCode
from supervisor.launch.local_controller import free_port
from supervisor.store.local_server import LocalObjectStore
from tests.node.nodeproc import cleanup, start_node, vanish, wait_for

pytestmark = pytest.mark.slow
TT = ["--module", "llama3", "--config", "llama3_debugmodel", "--training.steps", "3"]
CRASH = {"STANDIN_EXIT": "1"}  # every rank exits 1 after its steps: torchrun fails, the wrapper says 69


def _start(tmp_path, url, trainer_args=TT, env=None, extra=()):
    """One incarnation; returns (exit code, log text, seconds)."""
    log = tmp_path / f"node-{time.monotonic_ns()}.log"
    args = ["--checkpoints", url, "--trainer-module", "tests.node.standin_trainer", "--nproc-per-node", "1",
            "--cloud", "none", "--master-port", str(free_port()), *extra]  # fmt: skip
    t0 = time.monotonic()
    proc = start_node(args, trainer_args, env=env, log=log)
    try:
        code = proc.wait(300)
    finally:
        cleanup(proc)
    return code, log.read_text(errors="replace"), time.monotonic() - t0


def _record(url: str) -> dict:
    import fsspec

    fs, root = fsspec.core.url_to_fs(f"{url}/_supervise/restarts.json", skip_instance_cache=True)
    return json.loads(fs.cat_file(root))


def _commit(tmp_path, url: str, step: int) -> None:
    """What the trainer does after a periodic save: a real DCP save in the bucket, committed."""
    import fsspec
    import torch
    import torch.distributed.checkpoint as dcp

    from supervisor.store.catalog import Catalog

    local = tmp_path / f"save-{step}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process, no process group: intended
        dcp.save({"w": torch.full((64,), float(step))}, checkpoint_id=str(local))
    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True)  # this test's store, not a cached client
    fs.put(str(local) + "/", f"{root}/step-{step}/", recursive=True)
    Catalog(url).commit(step, world_size=1, writer="test")


def test_69_loop_gives_up_after_k_and_progress_resets_the_count(tmp_path, s3_url):
    k = ["--max-restarts-without-progress", "2"]
    for _ in range(2):
        code, log, _ = _start(tmp_path, s3_url, env=CRASH, extra=k)
        assert code == ExitCode.RETRYABLE, log
    _commit(tmp_path, s3_url, 4)  # the second incarnation committed step 4 before it crashed
    for _ in range(2):  # so the count starts over: two more 69s without progress are allowed
        code, log, _ = _start(tmp_path, s3_url, env=CRASH, extra=k)
        assert code == ExitCode.RETRYABLE and "resuming from step 4" in log, log
    code, log, _ = _start(tmp_path, s3_url, env=CRASH, extra=k)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert code == ExitCode.USER_ERROR and errors == [
        "error: gave up: 2 restarts without a new checkpoint; last error: "
        "torchrun failed (exit 1): worker crash, NCCL/gloo or store error"
    ], log
    assert "torchrun" not in log.replace(errors[0], "")  # nothing was started
    record = _record(s3_url)
    assert [(i["start_step"], i["code"]) for i in record["incarnations"]] == [
        (None, 69), (None, 69), (4, 69), (4, 69), (4, 78),
    ]  # fmt: skip
    assert record["args_ok"]  # TorchTitan's parser accepted the args once; later starts skip it

    # the recorded 78 ends the next start of the same config at once, without a crash (no STANDIN_EXIT)
    code, log, _ = _start(tmp_path, s3_url, extra=k)
    assert code == ExitCode.USER_ERROR and "gave up: 2 restarts" in log and "earlier start" in log
    # a changed config starts over and trains
    code, log, _ = _start(tmp_path, s3_url, trainer_args=[*TT[:-1], "4"], extra=k)
    assert code == ExitCode.FINISHED, log


def test_bad_titan_args_exit_78_naming_the_flag_then_at_once(tmp_path, s3_url):
    """Through the node: exit 78 naming the flag, then at once at the next start. The verdict
    of each kind of bad argument (unknown option, rejected value, wrong type) is
    tests/node/test_titan_config.py's, from the same parser without a node."""
    bad, words = ["--training.stepz", "5"], "unknown option --training.stepz (did you mean --training.steps?)"
    args = ["--module", "llama3", "--config", "llama3_debugmodel", *bad]
    code, log, seconds = _start(tmp_path, s3_url, trainer_args=args)
    assert code == ExitCode.USER_ERROR and f"TorchTitan rejects the trainer arguments: {words}" in log, log
    print(f"bad args {bad}: exit 78 after {seconds:.1f} s")  # reported, not asserted (no wall-clock asserts)
    code, log, _ = _start(tmp_path, s3_url, trainer_args=args)
    assert code == ExitCode.USER_ERROR and words in log and "earlier start" in log and "torchrun" not in log


def test_store_down_at_start_is_69_and_the_next_start_resumes(tmp_path, monkeypatch):
    with LocalObjectStore(tmp_path / "s3") as store:
        for key, value in store.env.items():
            monkeypatch.setenv(key, value)
        url = store.url("outage")
        _commit(tmp_path, url, 4)
        store.stop()
        # the store stays down for the whole bounded wait (SUPERVISE_STORE_RETRY_S, 60 s by default)
        code, log, _ = _start(tmp_path, url, env={"SUPERVISE_STORE_RETRY_S": "3"})
        assert code == ExitCode.RETRYABLE and "unreachable" in log, log
        store.start()  # same data folder and ports: the outage is over
        code, log, _ = _start(tmp_path, url)
        assert code == ExitCode.FINISHED and "resuming from step 4" in log, log


def _preempted_start(tmp_path, url, nodes: int = 1, *, how: str = "sigterm", extra=()):
    """One incarnation of `nodes` nodes, each in start-up (STANDIN_STARTUP_S), ended
    by a preemption. `how`: "sigterm", node 0 gets SIGTERM (a spot VM reclaimed);
    "survivor", the other nodes vanish, then node 0 gets SIGTERM (at OS shutdown);
    "peer", node 1 gets the notice and ends, then node 0's rank dies as its
    collectives would fail (69 with no notice of its own); "crash", node 1's rank
    crashes, then node 0 gets SIGTERM (SkyPilot stopping the survivor of a failed
    node). Returns node 0's (exit code, log)."""
    port, procs, logs = free_port(), [], []
    for rank in range(nodes):
        run_dir = tmp_path / f"run-{time.monotonic_ns()}-{rank}"
        logs.append(tmp_path / f"node{rank}-{time.monotonic_ns()}.log")
        args = ["--checkpoints", url, "--trainer-module", "tests.node.standin_trainer", "--nproc-per-node", "1",
                "--cloud", "none", "--master-port", str(port), "--run-dir", str(run_dir), *extra,
                # a node whose peer is gone: its torchrun waits for it at its exit barrier (300 s)
                "--grace", "3", "--hang-timeout", "3"]  # fmt: skip
        sky = {"SKYPILOT_NUM_NODES": str(nodes), "SKYPILOT_NODE_RANK": str(rank),
               "SKYPILOT_NODE_IPS": "\n".join(["127.0.0.1"] * nodes)}  # fmt: skip
        procs.append(start_node(args, TT, env={"STANDIN_STARTUP_S": "120", **sky}, log=logs[-1]))
        procs[-1].run_dir = run_dir
    try:
        wait_for(lambda: all((p.run_dir / f"pid-{rank}").exists() for rank, p in enumerate(procs)), timeout=180)
        if how == "survivor":
            for peer in procs[1:]:
                vanish(peer)
        if how == "peer":
            procs[1].send_signal(signal.SIGTERM)
            procs[1].wait(120)
            os.kill(int((procs[0].run_dir / "pid-0").read_text()), signal.SIGKILL)
        elif how == "crash":
            os.kill(int((procs[1].run_dir / "pid-1").read_text()), signal.SIGKILL)
            procs[1].wait(120)
            procs[0].send_signal(signal.SIGTERM)
        else:
            procs[0].send_signal(signal.SIGTERM)
        code = procs[0].wait(300)
    finally:
        for p in procs:
            cleanup(p)
    return code, logs[0].read_text(errors="replace")


def test_preemptions_during_start_up_never_end_the_job(tmp_path, s3_url):
    """Three starts reclaimed during start-up (a notice, nothing to save: 69), then a
    start that trains to the end: 0, not 78 (the default budget is 3)."""
    for _ in range(3):
        code, log = _preempted_start(tmp_path, s3_url)
        assert code == ExitCode.RETRYABLE and "preempted without a save (no training step completed yet)" in log, log
    code, log, _ = _start(tmp_path, s3_url)
    assert code == ExitCode.FINISHED, log
    record = _record(s3_url)
    assert [(i["code"], i["preempted"], i["cause"]) for i in record["incarnations"]] == [
        *[(69, True, "preemption notice (sigterm)")] * 3, (0, False, "finished")]  # fmt: skip


def test_the_survivor_of_a_partial_preemption_does_not_count(tmp_path, s3_url):
    """Two nodes, K=1 (one counted 69 ends the next start): node 1 vanishes and the
    survivor gets SIGTERM; then node 1 gets the notice and node 0 fails without
    one (seen at the next start, from node 1's mark); then the job trains to the end."""
    k = ["--max-restarts-without-progress", "1"]
    code, log = _preempted_start(tmp_path, s3_url, nodes=2, how="survivor", extra=k)
    assert code == ExitCode.RETRYABLE and "not counted as a restart without progress: preemption notice" in log, log
    code, log = _preempted_start(tmp_path, s3_url, nodes=2, how="peer", extra=k)
    assert code == ExitCode.RETRYABLE and "torchrun failed" in log, log  # its own view: a failure
    code, log, _ = _start(tmp_path, s3_url, extra=k)
    assert code == ExitCode.FINISHED, log
    assert [(i["code"], i["preempted"], i["cause"]) for i in _record(s3_url)["incarnations"]] == [
        (69, True, "preemption notice (sigterm)"),
        (69, True, "peer node 1 got a preemption notice (sigterm)"),
        (0, False, "finished"),
    ]  # fmt: skip


def test_a_crash_whose_survivor_gets_sigterm_still_counts(tmp_path, s3_url):
    """Node 1's rank crashes; then node 0 gets SIGTERM (as SkyPilot stops the rest of a
    failed job): node 0 alone would call it a preemption, but the first trouble in the
    cluster was a failure (node 1's mark), so with K=1 the next start gives up."""
    k = ["--max-restarts-without-progress", "1"]
    code, log = _preempted_start(tmp_path, s3_url, nodes=2, how="crash", extra=k)
    assert code == ExitCode.RETRYABLE and "not counted" in log, log  # its own view, amended at the next start
    code, log, _ = _start(tmp_path, s3_url, extra=k)
    assert code == ExitCode.USER_ERROR and "gave up: 1 restarts without a new checkpoint" in log, log
    assert _record(s3_url)["incarnations"][0]["cause"].startswith("peer node 1 failed first: torchrun failed")
