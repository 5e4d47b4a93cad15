"""The local backend with the real node wrapper and TorchTitan on CPU (slow)."""

from __future__ import annotations

import time

import pytest

from supervisor.demo import node_argv
from supervisor.launch.local import LocalJob, read_state
from supervisor.launch.procs import tagged
from supervisor.ledger.journal import read_events
from supervisor.store.catalog import Catalog

pytestmark = pytest.mark.slow


def test_stop_during_training_saves_commits_and_leaves_nothing(launcher, s3_url, titan_args, tmp_path):
    """Two real nodes; `stop` while training: the wrappers save and commit the current
    step, every process is gone, and no checkpoint is half committed."""
    args = titan_args(tmp_path / "dump", steps=500, checkpoint_interval=3)
    launcher.schedule(LocalJob(name="stopme", node_argv=node_argv(s3_url, args), num_nodes=2,
                               checkpoints_url=s3_url, ledger_url=f"{s3_url}/_ledger", graceful_timeout_s=90))
    deadline = time.monotonic() + 240
    while (read_state("stopme") or {}).get("step", 0) < 4:
        assert launcher.status("stopme")[0].state in ("PENDING", "STARTING", "RUNNING"), launcher.status("stopme")
        assert time.monotonic() < deadline, "training did not reach step 4"
        time.sleep(0.5)
    step_at_stop = read_state("stopme")["step"]
    launcher.cancel("stopme", graceful=True)
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

    events, problems = read_events(f"{s3_url}/_ledger")
    kinds = {e.kind for e in events}
    assert {"launch", "node_start", "trainer_start", "resume", "first_step", "progress", "checkpoint_committed",
            "notice", "exit", "job_finished"} <= kinds, kinds
    assert [e.get("state") for e in events if e.kind == "job_finished"] == ["CANCELLED"]
    assert 75 in {e.get("code") for e in events if e.kind == "exit"}, "the trainer saved on the stop's SIGTERM"
