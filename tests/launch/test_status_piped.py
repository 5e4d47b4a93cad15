"""`supervise status` piped (not a TTY: 80 columns): every name whole, a long REASON as
wrapped lines under its job, not a tall narrow column; a wide terminal keeps the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SUPERVISE = [sys.executable, "-m", "supervisor"]
REASON = ("the trainer exited 1 three times without a new checkpoint: RuntimeError: CUDA error: an illegal memory "
          "access was encountered while running step 45 of 1x[H100:8][Spot] (see the node logs)")
NAMES = ("demo-91234567-recovery", "demo-91234567-baseline")


def _status(tmp_path: Path, **env: str) -> str:
    """Two finished local jobs, as the local backend's state files record them; stdout is a pipe."""
    for name in NAMES:
        folder = tmp_path / "local" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "state.json").write_text(json.dumps({"state": "FAILED", "recoveries": 2, "reason": REASON}))
        (folder / "job.json").write_text("{}")
    base = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    done = subprocess.run([*SUPERVISE, "status"], env={**base, "SUPERVISE_HOME": str(tmp_path), **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_piped_status_keeps_names_whole_and_reasons_readable(tmp_path):
    out = _status(tmp_path)
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert [line.split()[0] for line in lines if not line.startswith(" ")] == sorted(NAMES)
    assert len(lines) <= 12  # two jobs, a few lines each
    assert " ".join(out.split()).count(REASON) == 2


def test_a_wide_terminal_keeps_the_table(tmp_path):
    out = _status(tmp_path, COLUMNS="400")
    assert "REASON" in out and all(name in out for name in NAMES) and REASON in out
