"""The contract between the node wrapper and the trainer processes it starts.

The wrapper (supervisor.node) and every rank of the trainer (supervisor.titan)
talk through a node-local run directory, named in the environment, so that no
socket or shared memory has to survive a crash:

    $SUPERVISE_RUN_DIR/notice.json        written by the wrapper when a preemption notice
                                          arrives: {"source", "received_at", "deadline"}
                                          (deadline: UTC epoch seconds, or null)
    $SUPERVISE_RUN_DIR/save_now.json      written by the wrapper when an early notice arrives
                                          (AWS's rebalance recommendation): {"source",
                                          "received_at", "deadline": null}; the ranks save at
                                          the next step boundary and train on, once per
                                          received_at
    $SUPERVISE_RUN_DIR/heartbeat/rank-R.json
                                          rewritten by rank R after every step:
                                          {"rank", "step", "time"}
    $SUPERVISE_RUN_DIR/outcome.json       written by local rank 0 of every node just before
                                          a clean exit, the same on every node (global rank
                                          0's decision, broadcast): {"outcome": "finished"|
                                          "preempted_saved"|"preempted_unsaved"|"commit_failed",
                                          "step", "reason", "host" (rank 0's)}; "step" is the
                                          last step done (finished), saved and committed
                                          (preempted_saved) or committed (preempted_unsaved,
                                          commit_failed; null if none)

All writes are atomic (write a temp file, then rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

ENV_RUN_DIR = "SUPERVISE_RUN_DIR"  # node-local folder described above
ENV_CHECKPOINTS = "SUPERVISE_CHECKPOINTS"  # catalog URL (the folder holding step-N)
ENV_LEDGER = "SUPERVISE_LEDGER"  # ledger URL, when the run keeps a journal
ENV_INCARNATION = "SUPERVISE_INCARNATION"  # id of this (re)start of the job
ENV_RESUME_STEP = "SUPERVISE_RESUME_STEP"  # catalog's verified step to load, or "none": start fresh
ENV_COMMIT_WAIT_S = "SUPERVISE_COMMIT_WAIT_S"  # seconds a commit polls for a mount's upload to land
DEFAULT_COMMIT_WAIT_S = 600.0  # its default: the longest a commit polls for the upload (it ends when the objects land)
ENV_CHECKPOINT_KEEP = "SUPERVISE_CHECKPOINT_KEEP"  # committed checkpoints kept during the run; unset/0: all
ENV_WRITE_MODE = "SUPERVISE_WRITE_MODE"  # where TorchTitan writes: WRITE_DIRECT (the catalog URL) or WRITE_MOUNT
WRITE_DIRECT, WRITE_MOUNT = "direct", "mount"  # (its checkpoint.folder is a mount of the catalog URL; unset: direct)
ENV_TORCHRUN_TIMES = "SUPERVISE_TORCHRUN_TIMES"  # the prestarted torchrun's start, import, wait (JSON)

NOTICE_FILE = "notice.json"
SAVE_NOW_FILE = "save_now.json"
OUTCOME_FILE = "outcome.json"
HEARTBEAT_DIR = "heartbeat"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` so that a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def heartbeat_steps(run_dir: Path) -> dict[int, int]:
    """rank -> last step, from whatever heartbeats exist in `run_dir` now."""
    steps: dict[int, int] = {}
    for path in (Path(run_dir) / HEARTBEAT_DIR).glob("rank-*.json"):
        beat = read_json(path)
        if beat and isinstance(beat.get("rank"), int) and isinstance(beat.get("step"), int):
            steps[beat["rank"]] = beat["step"]
    return steps
