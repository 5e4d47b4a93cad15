"""Ledger parity: the same sequence of preemptions gives the same classification in
`report --json` whether the job ran on the local emulator or on SkyPilot (slow).

The local side is real: the emulator runs the real `supervise node` wrapper (its
trainer is tests/node/standin_trainer.py, which keeps the runtime contract and saves
a real checkpoint into SeaweedFS at the notice; one node: the stand-in's ranks do not rendezvous
across nodes as TorchTitan's do) and injects the node's loss without notice (SIGKILL
of its process group), then a notice (SIGTERM to its wrapper). A 2-node loss with a
survivor is classified from hand-built SkyPilot ledgers in test_merged.py and on a
real SkyPilot in tests/e2e/test_slurm_two_nodes.py.

The SkyPilot side of the same run is what a SkyPilot job leaves: the nodes' own
events (on SkyPilot nobody else writes the journal, and every wrapper labels its own
incarnation: no SUPERVISE_INCARNATION is given), plus SkyPilot's own record of the
same transitions through the real ledger.skypilot.to_events. The record stands in
for the API server (none runs here): one row per transition as sky/jobs/state.py
writes them, the kill's RECOVERING row as set_recovering writes a lost cluster's
(no code), the notice's as a user-job exit's (code USER_JOB_FAILURE: 75 is in
recover_on_exit_codes). tests/e2e/test_slurm_two_nodes.py checks the same
classification against a real SkyPilot on a local Slurm.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import pytest

from supervisor.ledger.merged import USER_JOB_FAILURE, merge
from supervisor.ledger.skypilot import to_events
from supervisor.ledger.timeline import summarize

pytestmark = pytest.mark.slow

TRAINER = ["--module", "llama3", "--config", "llama3_debugmodel", "--training.steps", "40"]


def _classification(report: dict) -> dict:
    return {"causes": [ep["cause"] for ep in report["interruptions"]], "preemptions": report["preemptions"],
            "failures": report["failures"], "recoveries": report["recoveries"], "state": report["state"],
            "saved": [(ep["saved_step"], ep["resumed_step"], ep["lost_steps"]) for ep in report["interruptions"]
                      if ep["cause"] == "notice"]}


def _as_skypilot(events: list) -> tuple[list, tuple[list, list[str]]]:
    """The local run's ledger as a SkyPilot job would have left it (module docstring)."""
    journal = [replace(e, incarnation=f"{e.incarnation}-{e.writer.split('-')[0]}") for e in events
               if e.writer.startswith("node")]
    first_start: dict[str, float] = {}  # incarnation -> its first node start
    for e in events:
        if e.kind == "node_start":
            first_start[e.incarnation] = min(e.t, first_start.get(e.incarnation, e.t))
    launch = min(e.t for e in events) - 1.0  # the job was queued before its first event
    rows = [(launch + 0.1, "PENDING", None), (launch + 0.2, "STARTING", None)]
    for e in events:
        if e.kind == "recovery_started" and e.writer == "controller":
            kill = "lost (SIGKILL)" in str(e.get("reason"))
            rows.append((e.t, "RECOVERING", None if kill else USER_JOB_FAILURE))
    rows += [(t - 0.05, "RUNNING", None) for t in first_start.values()]
    end = next(e for e in events if e.kind == "job_finished")
    rows.append((end.t, end.get("state"), None))
    naive = lambda t: datetime.fromtimestamp(t, timezone.utc).replace(tzinfo=None).isoformat()  # noqa: E731
    record = {"job_id": 1, "status": end.get("state"), "submitted_at": launch + 0.1,
              "start_at": min(first_start.values()) - 0.05, "last_recovered_at": max(first_start.values()) - 0.05,
              "end_at": end.t, "recovery_count": len(first_start) - 1, "resources": "1x[CPU:4+][Spot]"}
    return journal, to_events(record, [{"new_status": s, "timestamp": naive(t), "code": c,
                                        "reason": "Cluster preempted or failed, recovering" if s == "RECOVERING"
                                        and c is None else s} for t, s, c in sorted(rows)])


def test_the_same_preemptions_classify_the_same_on_the_emulator_and_on_skypilot(s3_url, tmp_path, monkeypatch):
    from supervisor.launch.local import LocalBackend, LocalJob
    from supervisor.ledger.journal import read_events
    from supervisor.ledger.report import build_report, ledger_url_of as ledger_url
    from tests.node.nodeproc import REPO

    monkeypatch.setenv("SUPERVISE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    backend = LocalBackend()
    argv = ["supervise", "node", "--checkpoints", s3_url, "--trainer-module", "tests.node.standin_trainer",
            "--nproc-per-node", "1", "--cloud", "none", "--", *TRAINER]
    chaos = [{"kind": "kill", "at_step": 8, "node": 0}, {"kind": "notice", "at_step": 22, "node": 0}]
    backend.schedule(LocalJob(name="parity", node_argv=argv, num_nodes=1, checkpoints_url=s3_url,
                              ledger_url=ledger_url(s3_url), chaos=chaos,
                              env={"PYTHONPATH": str(REPO), "STANDIN_SAVE_EVERY": "0", "STANDIN_STEP_S": "0.2"}))
    try:
        st = backend.wait("parity", timeout_s=300)
    finally:
        for job in backend.status():
            if job.state not in ("SUCCEEDED", "FAILED", "CANCELLED", "FAILED_SETUP"):
                backend.cancel(job.name, graceful=False)
    assert st.state == "SUCCEEDED" and st.recoveries == 2, st

    local = build_report(ledger_url(s3_url))
    journal, backend_events = _as_skypilot(read_events(ledger_url(s3_url))[0])
    assert not any(e.kind == "preempted" and not e.get("with_notice") for e in journal)  # nobody wrote the loss
    skypilot = summarize(merge(journal, backend_events[0]), backend_events[1])
    expected = {"causes": ["no_notice", "notice"], "preemptions": {"notice": 1, "no_notice": 1}, "failures": 0,
                "state": "SUCCEEDED"}
    # (the stand-in trainer reports no steps, so no recovery "comes back" in either view: both count 0)
    assert {k: v for k, v in _classification(local).items() if k in expected} == expected, local["interruptions"]
    assert _classification(skypilot) == _classification(local), (skypilot["interruptions"], local["interruptions"])
    (saved, _resumed, lost), = _classification(local)["saved"]
    assert saved is not None and lost == 0
