"""The local backend with the real node wrapper and TorchTitan on CPU (slow),
launched through the public path: recipe -> JobSpec -> submit(backend="local")."""

from __future__ import annotations

import time
import uuid

import pytest
from typer.testing import CliRunner

from supervisor.cli import app
from supervisor.launch import submit
from supervisor.launch.local import read_state
from supervisor.launch.procs import tagged
from supervisor.ledger.journal import read_events
from supervisor.recipes import build_spec
from supervisor.contract.layout import ledger_url
from supervisor.store.catalog import Catalog
from supervisor.store.fs import Store

pytestmark = pytest.mark.slow


def test_stop_during_training_saves_commits_and_leaves_nothing(launcher, s3_store, s3_env):
    """Two real nodes of the debug recipe; `stop` while training: the wrappers save and
    commit the current step, every process is gone, and no checkpoint is half committed."""
    spec = build_spec("llama3_debug", name="stopme", sets=[
        f"checkpoint.bucket={s3_store.url(f't-{uuid.uuid4().hex[:8]}')}", "checkpoint.interval=3",
        "overrides.training.steps=500"])
    s3_url = spec.checkpoints_url
    submit(spec, backend="local", graceful_timeout_s=90)
    deadline = time.monotonic() + 600  # setup (tokenizer + corpus) and start-up on a busy 2-core machine
    while (read_state("stopme") or {}).get("step", 0) < 4:
        assert launcher.status("stopme")[0].state in ("PENDING", "STARTING", "RUNNING"), launcher.status("stopme")
        assert time.monotonic() < deadline, "training did not reach step 4"
        time.sleep(0.5)
    step_at_stop = read_state("stopme")["step"]
    stopped = CliRunner().invoke(app, ["stop", "stopme"])  # `supervise stop`: the local backend's cancel
    assert stopped.exit_code == 0, stopped.output
    assert launcher.status("stopme")[0].state == "CANCELLED"
    assert not tagged("stopme/")

    catalog = Catalog(s3_url)
    infos = catalog.list()
    assert infos and not [i for i in infos if i.state == "corrupt"], [i.to_json() for i in infos]
    for info in infos:
        if info.state == "committed":
            assert catalog.verify(info.step, deep=True).state == "committed"
    latest = catalog.latest()
    assert latest.step is not None and latest.step >= step_at_stop, "the stop saved and committed the current step"

    events, problems = read_events(ledger_url(s3_url))
    kinds = {e.kind for e in events}
    assert {"launch", "node_start", "trainer_start", "resume", "first_step", "progress", "checkpoint_committed",
            "notice", "exit", "job_finished"} <= kinds, kinds
    assert [e.get("state") for e in events if e.kind == "job_finished"] == ["CANCELLED"]
    # the stop request in the bucket, as on SkyPilot: both nodes saved the same step and exited 0 (a stop,
    # not a preemption: SkyPilot must not recover it, and the ledger has no `preempted`)
    exits = [e for e in events if e.kind == "exit"]
    assert {e.get("code") for e in exits} == {0} and len(exits) == 2, exits
    assert {e.get("notice") for e in exits} == {"stop"} and len({e.get("saved_step") for e in exits}) == 1, exits
    assert not any(e.kind == "preempted" for e in events)
    # it prints the step both nodes committed; the request is gone, so the next start is not stopped
    saved = exits[0].get("saved_step")
    assert f"stopped stopme: saved and committed step {saved}\n" in stopped.output and latest.step == saved
    assert "stop.json" not in Store(f"{s3_url}/_supervise").listdir()
