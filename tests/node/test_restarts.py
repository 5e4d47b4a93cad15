"""Restarts through a real `supervise node` against real SeaweedFS, with the stand-in
trainer (tests/node/standin_trainer.py) in place of TorchTitan's training loop: the
progress budget, TorchTitan's parser rejecting bad args, and a store outage at start.
Each `_start` is one incarnation, as a managed job would restart `run`."""

from __future__ import annotations

import json
import socket
import time
import warnings

import pytest

from supervisor.exitcodes import ExitCode
from supervisor.store.local_server import LocalObjectStore
from tests.node.nodeproc import cleanup, start_node

pytestmark = pytest.mark.slow
TT = ["--module", "llama3", "--config", "llama3_debugmodel", "--training.steps", "3"]
CRASH = {"STANDIN_EXIT": "1"}  # every rank exits 1 after its steps: torchrun fails, the wrapper says 69


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path, url, trainer_args=TT, env=None, extra=()):
    """One incarnation; returns (exit code, log text, seconds)."""
    log = tmp_path / f"node-{time.monotonic_ns()}.log"
    args = ["--checkpoints", url, "--trainer-module", "tests.node.standin_trainer", "--nproc-per-node", "1",
            "--cloud", "none", "--master-port", str(_port()), *extra]  # fmt: skip
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


@pytest.mark.parametrize(
    "bad, words",
    [
        (["--training.stepz", "5"], "unknown option --training.stepz (did you mean --training.steps?)"),
        (["--checkpoint.interval", "-3"], "--checkpoint.interval -3: Checkpoint interval needs to be at least 1 step"),
        (["--training.steps", "abc"], "--training.steps abc: invalid literal for int()"),
    ],
)  # fmt: skip
def test_bad_titan_args_exit_78_naming_the_flag_then_at_once(tmp_path, s3_url, bad, words):
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
