"""`supervise demo` end to end, through the real CLI (slow: two small 2-node trainings)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.local_jobs import stop_local_jobs

pytestmark = pytest.mark.slow

KEYS = ("wall_s", "productive_s", "checkpoint_s", "lost_s", "recovery_s", "queue_s", "goodput", "preemptions",
        "weights_match", "plot")


def _demo_stores() -> set[int]:
    import psutil

    return {p.pid for p in psutil.process_iter(["cmdline"])
            if any("supervise-demo-" in part for part in (p.info["cmdline"] or []))}


@pytest.mark.timeout(1800)  # two 2-node trainings; the suite's 900 s is too short on a busy 2-core machine
def test_demo_survives_chaos_with_identical_weights(tmp_path, monkeypatch):
    env = {**os.environ, "SUPERVISE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    supervise = [sys.executable, "-c", "from supervisor.cli import main; main()"]
    before = _demo_stores()
    proc = subprocess.run([*supervise, "demo", "--steps", "8", "--seed", "1", "--json", "--keep",
                           "--plot", str(tmp_path / "timeline.png")],
                          env=env, capture_output=True, text=True, timeout=1500)
    kept = {}
    try:
        assert proc.stdout.strip(), proc.stderr[-3000:]
        report = json.loads(proc.stdout)  # --json: stdout is exactly one JSON object
        kept = report["kept"]
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert all(k in report for k in KEYS)
        assert report["weights_match"] is True, report["weights_check"]
        row = report["drill"]  # the verdict is `supervise drill`'s, on the demo's drill set
        assert row["drill"] == "demo" and row["verdict"] == "PASS" and len(row["injected"]) == 3, row
        assert any("truncated" in what for what in row["injected"]), row  # the corrupt-newest drill's event
        # the notice: both nodes exit 75; the SIGKILLed incarnation records no exit; then 0 and 0
        assert row["recoveries"] == 2 and row["exit_codes"] == [[75, 75], [0, 0]], row
        assert report["preemptions"] == {"notice": 1, "no_notice": 1}
        parts = sum(report[k] for k in ("productive_s", "checkpoint_s", "lost_s", "recovery_s", "queue_s"))
        assert parts == pytest.approx(report["wall_s"], abs=0.01)
        assert report["lost_s"] > 0 and report["steps"]["recomputed"] > 0, "the kill + corrupt fallback lost work"
        assert 0 < report["goodput"] < 1

        png = Path(report["plot"])
        assert png == tmp_path / "timeline.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image

        h, w = matplotlib.image.imread(png).shape[:2]
        assert h > 200 and w > 400

        os.environ.update(kept["env"])  # read the kept journal through the kept store
        from supervisor.ledger.journal import read_events

        events, problems = read_events(report["ledger"])
        assert not problems
        kinds = Counter(e.kind for e in events)
        for kind in ("launch", "node_start", "trainer_start", "resume", "first_step", "progress",
                     "checkpoint_saved", "checkpoint_committed", "notice", "preempted", "exit", "chaos",
                     "recovery_started", "job_finished"):
            assert kinds[kind] >= 1, f"no {kind} event"
        assert kinds["recovery_started"] == 2 and kinds["launch"] == 1 and kinds["job_finished"] == 1
        assert {e.get("with_notice") for e in events if e.kind == "preempted"} == {True, False}
        # every incarnation started both nodes, and both rendezvoused (a step was trained after each restart)
        starts = Counter((e.incarnation, e.get("node_rank")) for e in events if e.kind == "node_start")
        assert set(starts) == {(i, r) for i in ("0", "1", "2") for r in (0, 1)}
        assert {e.incarnation for e in events if e.kind == "first_step"} == {"0", "1", "2"}
        # the restart after the kill found the newest checkpoint corrupt and fell back
        assert any(e.get("skipped") for e in events if e.kind == "resume" and e.incarnation == "2")

        # the demo is a user of `start --backend local`: the debug recipe's request, its setup, the launch event
        from supervisor.launch import dryrun
        from supervisor.recipes import build_spec

        job = json.loads((tmp_path / "home" / "local" / report["job"] / "job.json").read_text())
        spec = build_spec("llama3_debug", name=report["job"], num_nodes=2, sets=[
            f"checkpoint.bucket={job['checkpoints_url'].rsplit('/', 1)[0]}", "checkpoint.interval=2",
            "overrides.training.steps=8", "overrides.debug.seed=1", "overrides.debug.deterministic=true"])
        expected = dryrun(spec, backend="local")[1]
        assert job["node_argv"] == expected.node_argv and job["setup"] == expected.setup
        launch = [e for e in events if e.kind == "launch"]
        assert launch[0].get("backend") == "local" and launch[0].get("num_nodes") == 2
    finally:  # --keep left the store running: stop it, even when the demo failed
        stop_local_jobs(monkeypatch, tmp_path / "home")  # a demo killed by the timeout could not stop its jobs
        for pid in _demo_stores() - before:
            os.kill(pid, signal.SIGKILL)
        if kept:
            shutil.rmtree(kept["workdir"], ignore_errors=True)
    from supervisor.launch.procs import tagged

    for name in kept["jobs"]:
        assert not tagged(f"{name}/")
