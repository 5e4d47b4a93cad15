"""The end-to-end tests' handle on SkyPilot managed jobs on the local Slurm: one
`supervise start` of the debug recipe, SkyPilot's own record of its transitions
(the API server's sqlite, read-only), and the Slurm queue."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

from supervisor.contract.jobstate import is_terminal

SUPERVISE = str(Path(sys.executable).parent / "supervise")


def _run(argv: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


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


def _sky_end_at(sky_home: str, job_id: str) -> float:
    con = sqlite3.connect(f"file:{Path(sky_home) / '.sky' / 'spot_jobs.db'}?mode=ro", uri=True)
    try:
        return con.execute("SELECT max(end_at) FROM spot WHERE spot_job_id = ?", (int(job_id),)).fetchone()[0]
    finally:
        con.close()


def _first_after(events, state: str, after: float) -> float | None:
    return next((t for s, t, _ in events if s == state and t >= after), None)


class Job:
    """One `supervise start` of the debug recipe on the local Slurm."""

    def __init__(self, env: dict[str, str], bucket: str, kind: str, steps: int, extra: tuple[str, ...] = (),
                 num_nodes: int = 1):
        self.env, self.kind = env, kind
        self.name = f"e2e-{kind}-{uuid.uuid4().hex[:6]}"
        self.url = f"s3://{bucket}/e2e/{self.name}"
        self.t_launch = time.time()
        start = _run([
            SUPERVISE, "start", "llama3_debug", "--infra", "slurm", "--num-nodes", str(num_nodes), "--name", self.name,
            "--set", "checkpoint.mode=DIRECT", "--set", f"checkpoint.bucket=s3://{bucket}/e2e",
            "--set", f"overrides.training.steps={steps}", *extra, "--yes",
        ], env)  # fmt: skip
        assert start.returncode == 0, f"supervise start failed:\n{start.stdout}\n{start.stderr}"
        found = re.search(r"launched skypilot job (\d+)", start.stdout)
        assert found, f"no job id in the output of supervise start:\n{start.stdout}"
        self.job_id = found[1]
        self.finished = False

    def first_commit(self, timeout: float = 1500) -> int:
        from supervisor.store.catalog import Catalog

        deadline, polls = time.monotonic() + timeout, 0
        while True:
            assert time.monotonic() < deadline, f"{self.name}: no committed checkpoint; {_status(self.env, self.name)}"
            step = Catalog(self.url).latest().step
            if step is not None:
                return step
            polls += 1
            if polls % 15 == 0:
                state = _status(self.env, self.name).get("state")
                assert not is_terminal(state), f"{self.name} ended before its first checkpoint: {state}\n" \
                                              f"{_logs(self.env, self.job_id)[-3000:]}"
            time.sleep(2)

    def wait_terminal(self, user: str, timeout: float = 1800) -> tuple[dict, list[str], set[str]]:
        states, allocations = [], set()
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, f"{self.name} did not finish in time; states seen: {states}"
            status = _status(self.env, self.name)
            if status.get("state") and (not states or states[-1] != status["state"]):
                states.append(status["state"])
            allocations.update(_slurm_jobs(self.env, user))
            if is_terminal(status.get("state")):
                self.finished = True
                return status, states, allocations
            time.sleep(5)

    def cleanup(self, keep: Path) -> None:
        if not self.finished:  # leave nothing running on a failure
            _run(["sky", "jobs", "cancel", "-y", self.job_id], self.env, timeout=300)
        (keep / f"{self.name}.log").write_text(_logs(self.env, self.job_id))


def _logs(env: dict[str, str], job_id: str) -> str:
    out = _run(["sky", "jobs", "logs", "--no-follow", job_id], env, timeout=300)
    return out.stdout + out.stderr
