"""The real thing, on one machine: `supervise start llama3_debug --infra slurm`
goes through SkyPilot's `sky jobs launch` onto a local Slurm cluster with the
task exactly as `start` renders it by default: setup makes a Python 3.11 venv
with uv and installs the supervise wheel that `start` shipped with the job (no
wheelhouse, no find-links for our package; torch comes from the machine's local
CPU wheel), TorchTitan trains on the Slurm node and checkpoints into a local S3
server (SeaweedFS) under a bucket prefix. Two jobs run side by side:

- "recover": its setup fetches the tokenizer with the real `hf download` of the
  node's venv from a stand-in hub on loopback (tests/fakehub.py: this machine
  cannot reach huggingface.co; HF_ENDPOINT points the node's hf at it), on the
  first launch and again on the recovery. The test cancels its Slurm allocation mid-run (`scancel`: a
  preemption without notice) and checks that the managed job recovers
  (RUNNING -> RECOVERING -> RUNNING) on a new allocation, that TorchTitan resumes
  from the last committed step and finishes, and that `supervise report NAME
  --json` (the run ledger plus SkyPilot's own record) says SUCCEEDED, 1 recovery,
  phases that sum to the wall time, starting and ending at SkyPilot's timestamps.
- "stop": `supervise stop` during training; the nodes save, commit and exit, the
  job is cancelled, and the final step is committed and deep-verifies.

It prints (and writes to $SUPERVISE_E2E_REPORT, when set) the measured times:
setup on the first launch vs the recovery, detection (scancel -> RECOVERING),
recovery (RECOVERING -> RUNNING), scancel -> first step again, stop -> committed,
and the report's phases next to SkyPilot's timestamps. No wall-clock time is asserted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import infra_env
from tests.e2e.skyjobs import (SUPERVISE, Job, _first_after, _logs, _run, _sky_end_at, _sky_events,
                               _slurm_jobs)

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.timeout(2400)]

STEPS = 30  # TorchTitan steps; the recipe checkpoints every 5
HUB_REPO = "supervise-e2e/tiny-tokenizer"  # served by the stand-in hub


def _setups(ledger) -> list[float]:
    """Setup seconds per node start, in order (the setup script's ledger mark)."""
    return [round(float(e.get("duration_s")), 1) for e in ledger if e.kind == "setup"]


def test_slurm_managed_jobs_recover_from_scancel_stop_with_a_save_and_report(local_slurm, tmp_path, monkeypatch):
    from supervisor.ledger.journal import read_events
    from supervisor.store.catalog import Catalog
    from supervisor.store.local_server import LocalObjectStore

    from supervisor.titan.tinydata import build_assets
    from tests.fakehub import FakeHub

    user = local_slurm["SUPERVISE_SLURM_USER"]
    sky_home = local_slurm["SUPERVISE_SLURM_SKY_HOME"]
    # the recover job's tokenizer comes from the stand-in hub, its corpus from a folder the node user can read
    shared = Path(local_slurm["SUPERVISE_SLURM_DIR"]) / f"hub-{uuid.uuid4().hex[:6]}"
    assets = build_assets(shared)
    subprocess.run(["chmod", "-R", "a+rX", str(shared)], check=True)
    with LocalObjectStore(tmp_path / "s3") as store, FakeHub(HUB_REPO, assets.hf_assets_path) as hub:
        for key, value in store.env.items():
            monkeypatch.setenv(key, value)
        env = infra_env() | store.env | {
            "HOME": sky_home,
            "SLURM_CONF": local_slurm["SLURM_CONF"],
            "SUPERVISE_HOME": str(tmp_path / "supervise-home"),
        }
        times: dict[str, float] = {}
        recover = Job(env, store.bucket, "recover", STEPS, (
            "--set", "tokenizer.tiny=false", "--set", f"tokenizer.hf_repo={HUB_REPO}",
            "--set", f"dataset.path={assets.dataset_path}", "--set", f"envs.HF_ENDPOINT={hub.endpoint}"))
        jobs = [recover]
        try:
            # the recover job's allocation, known before the second job asks for one
            deadline = time.monotonic() + 900
            while not (allocations := _slurm_jobs(env, user)):
                assert time.monotonic() < deadline, f"no Slurm allocation for {recover.name}"
                time.sleep(2)
            # trains until stopped; on the same machine as "recover", so torchrun needs another port
            jobs.append(stop := Job(env, store.bucket, "stop", 100_000, ("--set", "envs.SUPERVISE_MASTER_PORT=8018")))

            # -- "recover": first committed checkpoint, then the allocation vanishes --------------
            recover.first_commit()
            times["first_commit_seen"] = time.time()
            assert set(allocations) <= set(_slurm_jobs(env, user)), "the recover job's allocation is gone"
            cancelled = _run(["scancel", *allocations], env, timeout=60)
            times["scancel"] = time.time()
            assert cancelled.returncode == 0, cancelled.stderr
            step_at_cancel = Catalog(recover.url).latest().step

            # -- "stop": supervise stop during training saves a final step ------------------------
            before_stop = stop.first_commit()
            times["stop_requested"] = time.time()
            stopped = _run([SUPERVISE, "stop", stop.name], env, timeout=1200)
            times["stop_returned"] = time.time()
            assert stopped.returncode == 0, f"{stopped.stdout}\n{stopped.stderr}"
            stop_status, stop_states, _ = stop.wait_terminal(user)

            status, states, _ = recover.wait_terminal(user)
            times["done"] = time.time()
        finally:
            for job in jobs:
                job.cleanup(tmp_path)
            # down.sh removes SkyPilot's logs; keep them (controller, provision, job) for a post-mortem.
            shutil.copytree(Path(sky_home) / "sky_logs", tmp_path / "sky_logs", dirs_exist_ok=True)

        report_out = _run([SUPERVISE, "report", recover.name, "--json"], env, timeout=300)
        report = json.loads(report_out.stdout) if report_out.returncode == 0 else {"error": report_out.stderr}

        # SkyPilot's own transitions, timestamped by the controller, and the node's side
        # from the run ledger in the bucket; measured first, asserted after.
        events = _sky_events(sky_home, recover.job_id)
        seq = [s for s, _, _ in events]
        t_recovering = _first_after(events, "RECOVERING", times["scancel"] - 1)
        t_running_again = _first_after(events, "RUNNING", t_recovering or times["scancel"])
        ledger, problems = read_events(f"{recover.url}/_ledger")
        incarnations = list(dict.fromkeys(e.incarnation for e in ledger if e.kind == "node_start"))
        second = incarnations[1] if len(incarnations) > 1 else None
        node_start = [e.t for e in ledger if e.kind == "node_start" and e.incarnation == second]
        resumes = [e.fields["step"] for e in ledger if e.kind == "resume" and e.incarnation == second]
        first_steps = [e for e in ledger if e.kind == "first_step" and e.incarnation == second]
        committed_before = [e.fields["step"] for e in ledger
                            if e.kind == "checkpoint_committed" and node_start and e.t < node_start[0]]  # fmt: skip
        stop_ledger, _ = read_events(f"{stop.url}/_ledger")
        stop_commits = [e for e in stop_ledger if e.kind == "checkpoint_committed" and e.t >= times["stop_requested"]]
        since = lambda t: round(t - times["scancel"], 1) if t else None  # noqa: E731
        sky_t = {s: t for s, t, _ in reversed(events)}  # first time of each state
        measured = {
            "jobs": [recover.name, stop.name],
            "bring_up_s": local_slurm["bring_up_s"],
            "launch_to_first_commit_seen_s": round(times["first_commit_seen"] - recover.t_launch, 1),
            "setup_s_per_node_start": _setups(ledger),  # first launch, then the recovery
            "step_at_scancel": step_at_cancel,
            "resumed_from_step": resumes[0] if resumes else None,
            "detection_s": since(t_recovering),  # scancel -> RECOVERING
            "recovery_s": round(t_running_again - t_recovering, 1) if t_recovering and t_running_again else None,
            "scancel_to_node_start_s": since(node_start[0] if node_start else None),
            "scancel_to_first_resumed_step_s": since(first_steps[0].t if first_steps else None),
            "launch_to_succeeded_seen_s": round(times["done"] - recover.t_launch, 1),
            "stop_command_s": round(times["stop_returned"] - times["stop_requested"], 1),
            "stop_final_commit_after_request_s": round(stop_commits[-1].t - times["stop_requested"], 1)
            if stop_commits else None,
            "stop_states": stop_states,
            "skypilot_states": seq,
            "states_polled": states,
            "report": {k: report.get(k) for k in ("state", "recoveries", "wall_s", "productive_s", "checkpoint_s",
                                                  "lost_s", "recovery_s", "queue_s", "residual_s", "phases",
                                                  "start", "end", "problems")},
            "report_interruptions": report.get("interruptions"),
            "skypilot_first_times": {s: round(t, 1) for s, t in sky_t.items()},
            "logs": str(tmp_path),
        }
        print("\nslurm e2e:", json.dumps(measured, indent=1, default=str))
        if os.environ.get("SUPERVISE_E2E_REPORT"):
            Path(os.environ["SUPERVISE_E2E_REPORT"]).write_text(json.dumps(measured, indent=1, default=str) + "\n")

        job_log = (tmp_path / f"{recover.name}.log").read_text()
        assert status["state"] == "SUCCEEDED", f"states seen: {states}\n{job_log[-3000:]}"
        assert status["recoveries"] >= 1, status
        assert t_recovering is not None, f"never RECOVERING after scancel: {events}"
        assert t_running_again is not None, f"never RUNNING again: {events}"
        assert seq[-1] == "SUCCEEDED", seq
        assert not problems, problems
        assert second is not None, f"expected a second node start after scancel: {incarnations}"
        resume = resumes[0]
        # The catalog is the truth for commits: the resume is at least its latest committed step
        # when the allocation vanished. The ledger's checkpoint_committed is written by the
        # journal's thread after the commit, so a kill within that write's round trip can leave
        # the last commit out of the ledger (seen once, 2026-12-04: committed_before == []).
        assert resume >= step_at_cancel and resume >= max(committed_before, default=0), (resume, committed_before)
        assert first_steps[0].fields["step"] == resume + 1
        latest = Catalog(recover.url).latest()
        assert (latest.step, latest.state) == (STEPS, "committed"), latest.describe()
        assert f"resuming from step {resume}" in job_log, job_log[-3000:]
        assert "Training completed" in job_log
        # the latest setup's log (the recovery's, which may reuse the venv) names the node's Python
        assert re.search(r"supervise setup: supervise-titan in \S+, Python 3\.11\.", job_log), job_log[-3000:]
        # the tokenizer step ran with the node's own hf at the launch, and again at the recovery
        # unless that setup restored the assets with the venv from the bucket's snapshot (issue 25)
        setups = [e.get("how") for e in ledger if e.kind == "setup"]
        assert setups[0] == "installed" and all(h in ("installed", "reused", "restored") for h in setups), setups
        infos = [p for m, p in hub.requests if p == f"/api/models/{HUB_REPO}/revision/main"]
        fetched = [p for m, p in hub.requests if m == "GET" and p.endswith("/tokenizer.json")]
        assert len(infos) >= setups.count("installed") and fetched, (setups, hub.requests)

        # the report of a SkyPilot job: its own record and transitions in the timeline
        assert report.get("state") == "SUCCEEDED" and report.get("recoveries") == 1, report
        parts = sum(report[k] for k in ("productive_s", "checkpoint_s", "lost_s", "recovery_s", "queue_s"))
        assert abs(parts - report["wall_s"]) < 1.0, report
        assert abs(report["start"] - sky_t["PENDING"]) < 5, (report["start"], sky_t)
        # the end is SkyPilot's record end_at (its SUCCEEDED job_events row came 20 s later in one run)
        assert abs(report["end"] - _sky_end_at(sky_home, recover.job_id)) < 5, (report["end"], events)
        assert report["recovery_s"] > 0 and report["queue_s"] > 0, report

        # "stop": the final save is committed and deep-verifies; the job did not recover
        stop_log = (tmp_path / f"{stop.name}.log").read_text()
        assert stop_status["state"] in ("CANCELLED", "SUCCEEDED"), (stop_states, stop_log[-3000:])
        assert stop_status["recoveries"] == 0, stop_status
        assert "stopped on request; state saved and committed at step" in stop_log, stop_log[-3000:]
        final = Catalog(stop.url).latest()
        assert final.state == "committed" and final.step > before_stop, final.describe()
        verify = _run([SUPERVISE, "checkpoints", "verify", stop.url, "--step", str(final.step), "--deep"], env)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert [e.get("source") for e in stop_ledger if e.kind == "notice"] == ["stop"]
