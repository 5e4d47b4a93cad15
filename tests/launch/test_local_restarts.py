"""The rendered restart rule on the local backend, end to end: the debug recipe's
request with the real `supervise node` and SeaweedFS; TorchTitan's training loop
is replaced by tests/node/standin_trainer.py (a crash after its steps, which the
wrapper reports as 69), so a crash loop takes seconds, not minutes (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataclasses import replace

from supervisor.contract.node import NodeOptions
from supervisor.launch import dryrun

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def crash_loop_job(s3_store, name: str, k: int):
    from supervisor.recipes import build_spec

    spec = build_spec("llama3_debug", name=name, num_nodes=1, sets=[
        f"checkpoint.bucket={s3_store.url('loops')}", f"recovery.max_restarts_without_progress={k}",
        "overrides.training.steps=3"])
    _, job = dryrun(spec, backend="local")
    # stand-in for TorchTitan's loop; no cloud metadata on this machine
    job.node_argv = replace(NodeOptions.from_argv(job.node_argv), trainer_module="tests.node.standin_trainer",
                            cloud="none").to_argv()
    job.setup = ""  # the stand-in reads no tokenizer or data
    job.env.update(STANDIN_EXIT="1", PYTHONPATH=str(ROOT))
    return job


def test_a_69_loop_ends_after_k_restarts_without_progress_and_stays_ended(launcher, s3_store, s3_env):
    launcher.schedule(crash_loop_job(s3_store, "loop", k=2))
    st = launcher.wait("loop", timeout_s=300)
    assert st.state == "FAILED" and st.recoveries == 2, st  # 69, 69 recovered freely; the third start gave up
    assert "exited 78 (user/config error)" in st.reason and "not retried" in st.reason
    assert "gave up: 2 restarts without a new checkpoint" in st.reason, st.reason

    launcher.forget("loop")  # the same job again: the recorded 78 ends it at its first start
    launcher.schedule(crash_loop_job(s3_store, "loop", k=2))
    st = launcher.wait("loop", timeout_s=120)
    assert st.state == "FAILED" and st.recoveries == 0 and "gave up" in st.reason, st
