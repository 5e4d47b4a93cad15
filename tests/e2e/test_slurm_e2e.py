"""The real thing, on one machine: `supervise start llama3_debug --infra slurm`
goes through SkyPilot's `sky jobs launch` onto a local Slurm cluster, TorchTitan
trains on the Slurm node and checkpoints into a local S3 server (SeaweedFS);
the test cancels the Slurm allocation mid-run (`scancel`: a preemption), and
checks that the managed job recovers (RUNNING -> RECOVERING -> RUNNING) on a new
allocation, that TorchTitan resumes from the last committed step and finishes.

It prints (and writes to $SUPERVISE_E2E_REPORT, when set) the measured times:
detection (scancel -> RECOVERING), recovery (RECOVERING -> RUNNING), and the
node-side view from the run ledger (scancel -> wrapper start / first step).
No wall-clock time is asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from tests.e2e.conftest import infra_env

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.timeout(2400)]

STEPS = 30  # TorchTitan steps; the recipe checkpoints every 5
TERMINAL = {"SUCCEEDED", "FAILED", "FAILED_SETUP", "FAILED_PRECHECKS", "FAILED_NO_RESOURCE",
            "FAILED_CONTROLLER", "CANCELLED", "CANCELLING"}


def _run(argv: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


SUPERVISE = str(Path(sys.executable).parent / "supervise")


def _status(env: dict[str, str], name: str) -> dict:
    out = _run([SUPERVISE, "status", name, "--json"], env, timeout=300)
    if out.returncode != 0:
        return {"state": None, "error": out.stderr.strip()[-500:]}
    return json.loads(out.stdout)[0]


def _slurm_jobs(env: dict[str, str], user: str) -> list[str]:
    out = _run(["squeue", "-h", "-u", user, "-o", "%i"], env, timeout=60)
    return out.stdout.split()


def _sky_events(sky_home: str, job_id: str) -> list[tuple[str, float, str]]:
    """SkyPilot's own record of the managed job's state changes: (state, epoch, reason)."""
    db = Path(sky_home) / ".sky" / "spot_jobs.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT new_status, timestamp, reason FROM job_events WHERE spot_job_id = ? ORDER BY id", (int(job_id),)
        ).fetchall()
    finally:
        con.close()
    # Naive local-time strings, written by the API server on this machine.
    return [(s, datetime.fromisoformat(t).timestamp(), r or "") for s, t, r in rows]


def _first_after(events, state: str, after: float) -> float | None:
    return next((t for s, t, _ in events if s == state and t >= after), None)


def test_slurm_managed_job_recovers_from_scancel_and_resumes(local_slurm, tmp_path, monkeypatch):
    from supervisor.ledger.journal import read_events
    from supervisor.store.catalog import Catalog
    from supervisor.store.local_server import LocalObjectStore

    name = f"e2e-slurm-{uuid.uuid4().hex[:6]}"
    user = local_slurm["SUPERVISE_SLURM_USER"]
    sky_home = local_slurm["SUPERVISE_SLURM_SKY_HOME"]
    with LocalObjectStore(tmp_path / "s3") as store:
        for key, value in store.env.items():
            monkeypatch.setenv(key, value)
        env = infra_env() | store.env | {
            "HOME": sky_home,
            "SLURM_CONF": local_slurm["SLURM_CONF"],
            "SUPERVISE_HOME": str(tmp_path / "supervise-home"),
        }
        url = f"s3://{store.bucket}/e2e/{name}"
        times: dict[str, float] = {"launch": time.time()}
        start = _run([
            SUPERVISE, "start", "llama3_debug", "--infra", "slurm", "--num-nodes", "1", "--name", name,
            "--set", "checkpoint.mode=DIRECT", "--set", f"checkpoint.bucket=s3://{store.bucket}/e2e",
            "--set", f"overrides.training.steps={STEPS}", "--yes",
        ], env)  # fmt: skip
        assert start.returncode == 0, f"supervise start failed:\n{start.stdout}\n{start.stderr}"
        job_id = start.stdout.split("launched managed job ", 1)[1].split()[0]
        finished = False
        try:
            # -- wait for the first committed checkpoint, then preempt -----------------
            catalog = Catalog(url)
            deadline = time.monotonic() + 1500
            seen_step, polls = None, 0
            while seen_step is None:
                assert time.monotonic() < deadline, f"no committed checkpoint in time; last status {_status(env, name)}"
                time.sleep(2)
                polls += 1
                seen_step = catalog.latest().step
                if seen_step is None and polls % 15 == 0:
                    state = _status(env, name).get("state")
                    assert state not in TERMINAL, f"job ended before its first checkpoint: {state}\n{_logs(env, job_id)[-3000:]}"
            times["first_commit_seen"] = time.time()
            allocations = _slurm_jobs(env, user)
            assert allocations, "a checkpoint was committed but the Slurm allocation is gone"
            cancelled = _run(["scancel", *allocations], env, timeout=60)
            times["scancel"] = time.time()
            assert cancelled.returncode == 0, cancelled.stderr
            step_at_cancel = catalog.latest().step

            # -- watch SkyPilot bring it back and finish ------------------------------------
            states, allocations_seen = [], set(allocations)
            deadline = time.monotonic() + 1800
            while True:
                assert time.monotonic() < deadline, f"job did not finish in time; states seen: {states}"
                status = _status(env, name)
                if status.get("state") and (not states or states[-1] != status["state"]):
                    states.append(status["state"])
                allocations_seen.update(_slurm_jobs(env, user))
                if status.get("state") in TERMINAL:
                    finished = True
                    times["done"] = time.time()
                    break
                time.sleep(5)
        finally:
            if not finished:  # leave nothing running on a failure
                _run(["sky", "jobs", "cancel", "-y", "-n", name], env, timeout=300)
            # down.sh removes SkyPilot's logs; keep them (controller, provision, job) for a post-mortem.
            shutil.copytree(Path(sky_home) / "sky_logs", tmp_path / "sky_logs", dirs_exist_ok=True)
            (tmp_path / "job.log").write_text(_logs(env, job_id))

        # SkyPilot's own transitions, timestamped by the controller, and the node's
        # side from the run ledger in the bucket; measured first, asserted after.
        events = _sky_events(sky_home, job_id)
        seq = [s for s, _, _ in events]
        t_recovering = _first_after(events, "RECOVERING", times["scancel"] - 1)
        t_running_again = _first_after(events, "RUNNING", t_recovering or times["scancel"])
        ledger, problems = read_events(f"{url}/_ledger")
        incarnations = list(dict.fromkeys(e.incarnation for e in ledger if e.kind == "node_start"))
        second = incarnations[1] if len(incarnations) > 1 else None
        node_start = [e.t for e in ledger if e.kind == "node_start" and e.incarnation == second]
        resumes = [e.fields["step"] for e in ledger if e.kind == "resume" and e.incarnation == second]
        first_steps = [e for e in ledger if e.kind == "first_step" and e.incarnation == second]
        committed_before = [e.fields["step"] for e in ledger
                            if e.kind == "checkpoint_committed" and node_start and e.t < node_start[0]]  # fmt: skip
        since = lambda t: round(t - times["scancel"], 1) if t else None  # noqa: E731
        report = {
            "job": name,
            "bring_up_s": local_slurm["bring_up_s"],
            "launch_to_first_commit_seen_s": round(times["first_commit_seen"] - times["launch"], 1),
            "step_at_scancel": step_at_cancel,
            "resumed_from_step": resumes[0] if resumes else None,
            "detection_s": since(t_recovering),  # scancel -> RECOVERING
            "recovery_s": round(t_running_again - t_recovering, 1) if t_recovering and t_running_again else None,
            "scancel_to_node_start_s": since(node_start[0] if node_start else None),
            "scancel_to_first_resumed_step_s": since(first_steps[0].t if first_steps else None),
            "launch_to_succeeded_seen_s": round(times["done"] - times["launch"], 1),
            "skypilot_states": seq,
            "states_polled": states,
            "logs": str(tmp_path),
        }
        print("\nslurm e2e:", json.dumps(report, indent=1))
        if os.environ.get("SUPERVISE_E2E_REPORT"):
            Path(os.environ["SUPERVISE_E2E_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")

        job_log = (tmp_path / "job.log").read_text()
        assert status["state"] == "SUCCEEDED", f"states seen: {states}\n{job_log[-3000:]}"
        assert status["recoveries"] >= 1, status
        assert allocations_seen - set(allocations), "the recovery did not get a new Slurm allocation"
        assert t_recovering is not None, f"never RECOVERING after scancel: {events}"
        assert t_running_again is not None, f"never RUNNING again: {events}"
        assert seq[-1] == "SUCCEEDED", seq
        assert not problems, problems
        assert second is not None, f"expected a second node start after scancel: {incarnations}"
        resume = resumes[0]
        assert resume == max(committed_before), (resume, committed_before)
        assert resume >= step_at_cancel
        assert first_steps[0].fields["step"] == resume + 1
        latest = Catalog(url).latest()
        assert (latest.step, latest.state) == (STEPS, "committed"), latest.describe()
        assert f"resuming from step {resume}" in job_log, job_log[-3000:]
        assert "Training completed" in job_log


def _logs(env: dict[str, str], job_id: str) -> str:
    out = _run(["sky", "jobs", "logs", "--no-follow", job_id], env, timeout=300)
    return out.stdout + out.stderr
