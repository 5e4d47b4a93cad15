"""Views at a terminal answer fast: an unknown job name from the registry alone (no
SkyPilot API server, no jobs controller), an unreachable bucket with one line in
seconds (the store's BRIEF retry policy), through the real `supervise` entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from supervisor import registry
from supervisor.launch.local import job_dir
from supervisor.launch.local_controller import free_port
from supervisor.contract.runtime import write_json_atomic
from supervisor.store import retry

# The real entry point; on exit it says whether SkyPilot was imported at all.
SUPERVISE = [sys.executable, "-c",
             "import atexit, sys\n"
             "atexit.register(lambda: print('sky imported:', 'sky' in sys.modules, file=sys.stderr))\n"
             "from supervisor.cli import main; main()"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERVISE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def dead_store_env(home, monkeypatch):
    """An S3 endpoint where nothing listens: a wrong AWS_ENDPOINT_URL, or a store that is down."""
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SUPERVISE_STORE_READ_RETRY_S", raising=False)
    monkeypatch.setenv("SUPERVISE_STORE_RETRY_S", "120")  # the patient policy must not be the one that answers
    return {**os.environ, **env}


def _run(env, *args) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run([*SUPERVISE, *args], env=env, capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - start


def _finished_local_job(name: str, checkpoints_url: str) -> None:
    """What the local backend leaves for a job that ended: its registry entry, job.json, state.json."""
    registry.record(name, backend="local", checkpoints_url=checkpoints_url, job_id=f"local-{name}-1")
    write_json_atomic(job_dir(name) / "job.json", {"name": name, "checkpoints_url": checkpoints_url})
    write_json_atomic(job_dir(name) / "state.json", {"state": "SUCCEEDED", "job_id": f"local-{name}-1", "recoveries": 0})


@pytest.mark.parametrize("command", ["status", "logs", "stop"])
def test_an_unknown_name_is_answered_from_the_registry_without_skypilot(home, command):
    done, _ = _run({**os.environ, "SUPERVISE_HOME": str(home)}, command, "nosuchjob")
    assert done.returncode == 1, done
    lines = done.stderr.splitlines()
    assert lines[0] == "error: no job named 'nosuchjob'; `supervise status` lists jobs", done.stderr
    assert lines[-1] == "sky imported: False"  # no API server, no jobs controller


def test_a_registered_skypilot_name_still_asks_skypilot(home, monkeypatch, supervise):
    """The SkyPilot API server is replaced at the SDK boundary (none runs here)."""
    from supervisor.launch import skypilot

    registry.record("run-b", backend="skypilot", checkpoints_url="", job_id="5")
    asked = []
    monkeypatch.setattr(skypilot, "_queue", lambda: asked.append(1) or [{"job_id": 5, "job_name": "run-b",
                                                                       "status": "RUNNING", "recovery_count": 1}])
    res = supervise("status", "run-b", "--json")
    assert res.returncode == 0 and asked, res
    assert json.loads(res.stdout)[0]["state"] == "RUNNING"


def test_status_of_a_job_whose_bucket_is_unreachable_answers_in_seconds_with_one_line(dead_store_env):
    _finished_local_job("far", "s3://ckpts/runs/far")
    _finished_local_job("far-too", "s3://ckpts/runs/far-too")  # same bucket: not asked again
    done, took = _run(dead_store_env, "status", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["far"]["state"] == "SUCCEEDED" and rows["far"]["step"] is None and rows["far"]["goodput"] is None
    warnings = [line for line in done.stderr.splitlines() if line != "sky imported: False"]
    assert len(warnings) == 1, done.stderr  # no retry lines
    assert "store unreachable" in warnings[0] and dead_store_env["AWS_ENDPOINT_URL"] in warnings[0]
    assert took < 60, took  # "in seconds": the patient policy alone would take 120 s per call


def test_checkpoints_list_of_an_unreachable_store_fails_in_seconds_with_one_line(dead_store_env):
    done, took = _run(dead_store_env, "checkpoints", "list", "s3://ckpts/runs/far")
    assert done.returncode == 2, done
    lines = [line for line in done.stderr.splitlines() if not line.startswith("sky imported")]
    assert len(lines) == 1 and "store unreachable" in lines[0] and "AWS_ENDPOINT_URL" in lines[0], done.stderr
    assert took < 60, took


def test_report_of_an_unreachable_store_ends_in_seconds(dead_store_env):
    _finished_local_job("far", "s3://ckpts/runs/far")
    done, took = _run(dead_store_env, "report", "far")
    assert done.returncode == 1, done
    text = "".join(line for line in done.stderr.splitlines() if not line.startswith("sky imported"))  # rich wraps
    assert text.startswith("warning: cannot list the journal") and dead_store_env["AWS_ENDPOINT_URL"] in text
    assert text.count("warning:") == 1 and "retrying" not in text and "nothing to report" in text, done.stderr
    assert took < 60, took


def test_policies_differ_only_in_patience_and_voice(monkeypatch):
    monkeypatch.delenv("SUPERVISE_STORE_READ_RETRY_S", raising=False)
    monkeypatch.delenv("SUPERVISE_STORE_RETRY_S", raising=False)
    assert retry.BRIEF.deadline_s() < retry.PATIENT.deadline_s() and retry.BRIEF.quiet and not retry.PATIENT.quiet
    monkeypatch.setenv("SUPERVISE_STORE_READ_RETRY_S", "0.5")
    attempts = []

    def flaky():
        attempts.append(1)
        raise ConnectionResetError("reset")

    with pytest.raises(ConnectionResetError):
        retry.BRIEF.call(flaky)
    assert len(attempts) > 1  # retried, within its own short deadline
    assert not retry.is_transient(PermissionError("denied"))  # one classification for both
