"""`supervise start --backend local recipes/llama3_debug.yaml`, as a user types it
(slow: real setup, real TorchTitan on CPU, the embedded S3 store as the bucket)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from supervisor.launch.base import is_terminal
from supervisor.recipes import RECIPES_DIR

pytestmark = pytest.mark.slow

SUPERVISE = [sys.executable, "-c", "from supervisor.cli import main; main()"]


def supervise(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*SUPERVISE, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_start_local_runs_the_debug_recipe_with_its_own_setup(s3_store, s3_env, tmp_path):
    name = f"dbg-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "SUPERVISE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
           "SUPERVISE_BUCKET": s3_store.url("runs")}
    started = supervise(env, "start", "--backend", "local", str(RECIPES_DIR / "llama3_debug.yaml"), "--name", name,
                        "--num-nodes", "1", "--set", "overrides.training.steps=4", "--set", "checkpoint.interval=2")
    assert started.returncode == 0, started.stderr
    assert f"launched local job local-{name}-" in started.stdout

    deadline = time.monotonic() + 420
    while True:
        status = supervise(env, "status", name, "--json")
        assert status.returncode == 0, status.stderr
        row = json.loads(status.stdout)[0]
        if is_terminal(row["state"]):
            break
        assert time.monotonic() < deadline, row
        time.sleep(2)
    logs = supervise(env, "logs", name).stdout
    assert row["state"] == "SUCCEEDED", (row, logs[-3000:])
    assert row["backend"] == "local" and row["step"] == 4 and row["recoveries"] == 0
    assert row["checkpoints_url"] == s3_store.url(f"runs/{name}")

    # the recipe's own setup ran once, in the node's directory, before the node command
    assert "=== setup, node 0/1 ===" in logs and logs.index("=== setup") < logs.index("=== incarnation 0")
    node_dir = tmp_path / "home" / "local" / name / "nodes" / "node-0"
    assert (node_dir / "supervise-assets" / "hf_assets" / "tokenizer.json").is_file()

    report = supervise(env, "report", name, "--json")
    assert report.returncode == 0, report.stderr
    r = json.loads(report.stdout)
    assert r["state"] == "SUCCEEDED" and r["problems"] == [], r

    from supervisor.ledger.journal import read_events
    from supervisor.contract.layout import ledger_url

    events, _ = read_events(ledger_url(row["checkpoints_url"]))
    launch = [e for e in events if e.kind == "launch"]
    assert len(launch) == 1 and launch[0].get("backend") == "local" and launch[0].get("num_nodes") == 1
    assert launch[0].get("job_id", "").startswith(f"local-{name}-")
    # the start-up broken down by what the node and the trainer wrote, in order
    order = [e.kind for e in sorted(events, key=lambda e: e.t)
             if e.kind in ("node_start", "trainer_ready", "checkpoint_loaded", "first_step")]
    assert order == ["node_start", "trainer_ready", "checkpoint_loaded", "first_step"], order
    # the prestarted torchrun's timings: the wrapper's share of the critical path
    ready = next(e for e in events if e.kind == "trainer_ready")
    started, node = ready.get("torchrun_started_at"), next(e for e in events if e.kind == "node_start")
    assert started is not None and started < node.t and ready.get("torchrun_import_s") > 0 \
        and ready.get("torchrun_waited_s") >= 0, ready.fields
    start = r["phases"]["start"]
    assert start["setup_s"] > 0 and start["startup_s"] > 0 and start["checkpoint_load_s"] >= 0 \
        and start["first_step_s"] > 0, start

    stop = supervise(env, "stop", name)
    assert stop.returncode == 0 and "already finished: SUCCEEDED" in stop.stdout
