"""AWS's rebalance recommendation as an early notice, through `supervise node` with
real torchrun, a stand-in IMDS (tests/node/fake_metadata.py: what this machine
cannot reach) and real SeaweedFS: one save at the recommendation while training
goes on, then exit 75 with no step lost at the interruption notice, with TorchTitan's
llama3 debug model on CPU (supervisor.titan.train), which saves through DCP and commits."""

from __future__ import annotations

import json

import pytest

from supervisor.contract.exitcodes import ExitCode
from supervisor.launch.local_controller import free_port
from supervisor.contract.layout import ledger_url
from supervisor.contract.runtime import heartbeat_steps
from tests.node.fake_metadata import FakeMetadata, urls_for
from tests.node.nodeproc import cleanup, start_node, wait_for

pytestmark = pytest.mark.slow


def _step(run_dir) -> int:
    return max(heartbeat_steps(run_dir).values(), default=0)


def _committed(url: str) -> list[int]:
    from supervisor.store.catalog import Catalog

    return [s for s in Catalog(url).steps() if Catalog(url).inspect(s).state == "committed"]


def _events(url: str, kind: str) -> list:
    from supervisor.ledger.journal import read_events

    return [e for e in read_events(ledger_url(url))[0] if e.kind == kind]


def test_rebalance_saves_once_and_trains_on_then_the_notice_loses_nothing(tmp_path, s3_url, titan_args):
    """Rebalance recommendation after step 3: exactly one committed save while the
    steps go on; then the interruption notice: 75, its step >= the last step done.
    No periodic save comes between (interval 1000): the saves are the early notice's
    and the notice's."""
    url, run_dir = s3_url, tmp_path / "run"
    trainer_args = titan_args(tmp_path / "dump", steps=200, checkpoint_interval=1000)
    with FakeMetadata("aws") as imds:
        args = ["--checkpoints", url, "--nproc-per-node", "1", "--master-port", str(free_port()),
                "--run-dir", str(run_dir), "--cloud", "aws", "--aws-metadata-url", urls_for(imds)["aws"],
                "--notice-poll", "0.2"]  # fmt: skip
        proc = start_node(args, trainer_args, log=tmp_path / "node.log")
        try:
            wait_for(lambda: _step(run_dir) >= 3, 300)
            imds.rebalance()
            (early,) = wait_for(lambda: _committed(url), 120)
            wait_for(lambda: _step(run_dir) >= early + 3, 120)  # training went on
            assert proc.poll() is None
            done_before = _step(run_dir)
            imds.preempt(60)
            code = proc.wait(180)
        finally:
            cleanup(proc)
    log = (tmp_path / "node.log").read_text(errors="replace")
    assert code == ExitCode.PREEMPTED_SAVED, log
    outcome = json.loads((run_dir / "outcome.json").read_text())
    assert outcome["outcome"] == "preempted_saved" and outcome["step"] >= done_before  # 0 steps lost
    assert _committed(url) == [early, outcome["step"]]
    assert [e.get("save") for e in _events(url, "early_save")] == [True]
    assert [e.get("source") for e in _events(url, "early_notice")] == ["aws-rebalance"]
    assert "early notice from aws-rebalance" in log

