"""A stand-in for supervisor.titan.train, for wrapper tests that need real
torchrun, real signals and real processes but not real training: it keeps the
runtime contract (heartbeats, notice.json -> outcome.json) and nothing else.
`--training.steps N` sets the length; the environment the rest, so that the args
stay ones TorchTitan's parser accepts (the wrapper checks them): STANDIN_STEP_S the
step time (default 0.1 s), STANDIN_EXIT a non-zero exit of every rank after the
last step instead of finishing (a crash, which the wrapper reports as 69),
STANDIN_STARTUP_S a start-up before the first step (TorchTitan building the
model); a notice during it finds no step to save, as the trainer reports it.

Saves (off unless STANDIN_SAVE_EVERY is set): rank 0 writes a real single-rank DCP
checkpoint of STANDIN_SAVE_BYTES (default 1 MiB) into $SUPERVISE_CHECKPOINTS/step-N
through the store API, commits it with the catalog, and records `checkpoint_saved` /
`checkpoint_committed` with their measured durations in the run ledger, as the
trainer does: every STANDIN_SAVE_EVERY steps (0: only at a notice) and at a notice
(then outcome "preempted_saved", or "preempted_unsaved" with the reason when the
save or the commit failed), as the trainer does. STANDIN_STORE_ENDPOINT sends this process's
store traffic to another endpoint (a throttling proxy in front of the store)."""

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from supervisor.contract.runtime import (
    ENV_CHECKPOINTS,
    ENV_INCARNATION,
    ENV_LEDGER,
    ENV_RUN_DIR,
    HEARTBEAT_DIR,
    NOTICE_FILE,
    OUTCOME_FILE,
    write_json_atomic,
)


def _arg(name: str, default: str) -> str:
    args = sys.argv[1:]
    return args[args.index(name) + 1] if name in args else default


class Saver:
    """Rank 0's saves: DCP into a temp dir, uploaded through the store, committed."""

    def __init__(self, every: int):
        from supervisor.ledger.journal import Journal

        self.every = every
        self.url = os.environ[ENV_CHECKPOINTS]
        self.size = int(os.environ.get("STANDIN_SAVE_BYTES", str(1 << 20)))
        node = os.environ.get("GROUP_RANK", "0")
        self.journal = Journal(os.environ[ENV_LEDGER], writer=f"node{node}-rank0",
                               incarnation=os.environ.get(ENV_INCARNATION))
        self.last_saved = 0

    def save(self, step: int) -> None:
        """Save and commit `step`; raises with the reason when either fails."""
        import torch
        import torch.distributed.checkpoint as dcp

        from supervisor.store.catalog import Catalog
        from supervisor.store.fs import Store

        t0 = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / f"step-{step}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # single process, no process group: intended
                dcp.save({"w": torch.full((self.size // 4,), float(step))}, checkpoint_id=str(local))
            store = Store(self.url)
            files = sorted(local.iterdir(), key=lambda f: (f.name == ".metadata", f.name))  # .metadata last, as DCP
            for f in files:
                store.put(f.read_bytes(), f"step-{step}", f.name)
        self.last_saved = step
        self.journal.emit("checkpoint_saved", step=step, duration_s=round(time.monotonic() - t0, 3))
        t1 = time.monotonic()
        try:
            Catalog(self.url).commit(step, world_size=1, writer="standin-rank0")
        except Exception as err:
            raise RuntimeError(f"saved step {step} but could not commit it: {type(err).__name__}: {err}") from err
        self.journal.emit("checkpoint_committed", step=step, duration_s=round(time.monotonic() - t1, 3))

    def at_notice(self, step: int) -> dict:
        if self.last_saved == step:
            return {"outcome": "preempted_saved", "step": step, "reason": "step already saved"}
        try:
            self.save(step)
        except Exception as err:
            return {"outcome": "preempted_unsaved", "step": None, "reason": str(err)}
        return {"outcome": "preempted_saved", "step": step, "reason": "notice without deadline: saved"}


def started_up(run_dir: Path, rank: int) -> bool:
    """STANDIN_STARTUP_S of start-up; False when a notice came first (rank 0 says
    there was nothing to save, as the trainer does before its first step)."""
    end = time.monotonic() + float(os.environ.get("STANDIN_STARTUP_S", "0"))
    while time.monotonic() < end:
        if (run_dir / NOTICE_FILE).exists():
            if rank == 0:
                write_json_atomic(run_dir / OUTCOME_FILE, {"outcome": "preempted_unsaved", "step": None,
                                                           "reason": "no training step completed yet"})
            return False
        time.sleep(0.05)
    return True


def main() -> None:
    run_dir = Path(os.environ[ENV_RUN_DIR])
    rank = int(os.environ["RANK"])
    steps = int(_arg("--training.steps", "1000"))
    step_s = float(os.environ.get("STANDIN_STEP_S", "0.1"))
    if os.environ.get("STANDIN_STORE_ENDPOINT"):
        os.environ["AWS_ENDPOINT_URL"] = os.environ["STANDIN_STORE_ENDPOINT"]
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    saver = Saver(int(os.environ["STANDIN_SAVE_EVERY"])) if rank == 0 and "STANDIN_SAVE_EVERY" in os.environ else None
    pid_file = run_dir / f"pid-{rank}"  # written whole: the tests read it the moment it exists
    pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
    pid_file.with_suffix(".tmp").replace(pid_file)
    if not started_up(run_dir, rank):
        return
    for step in range(1, steps + 1):
        time.sleep(step_s)
        write_json_atomic(run_dir / HEARTBEAT_DIR / f"rank-{rank}.json", {"rank": rank, "step": step, "time": time.time()})
        if (run_dir / NOTICE_FILE).exists():
            if rank == 0:
                outcome = saver.at_notice(step) if saver else {"outcome": "preempted_saved", "step": step,
                                                                "reason": "notice"}
                write_json_atomic(run_dir / OUTCOME_FILE, outcome)
            return
        if saver and saver.every and step % saver.every == 0:
            saver.save(step)
    if os.environ.get("STANDIN_EXIT"):
        sys.exit(int(os.environ["STANDIN_EXIT"]))
    if rank == 0:
        write_json_atomic(run_dir / OUTCOME_FILE, {"outcome": "finished", "step": steps, "reason": ""})


if __name__ == "__main__":
    main()
