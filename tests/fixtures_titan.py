"""Fixtures: tiny corpus, tokenizer and TorchTitan args for CPU runs (owner: titan).

- `titan_assets` (session): the synthetic corpus and its tokenizer, built once.
- `titan_args(dump_folder, steps=..., checkpoint_interval=...)`: TorchTitan
  args for the llama3 debug model on them (checkpoint flags are the caller's,
  as the node wrapper adds them; see `checkpoint_args`).
- `TitanRun` / `start_trainer`: a real `torchrun -m supervisor.titan.train`
  in its own session, with helpers to wait for a step, SIGKILL the whole
  process tree (a vanished VM) and collect the log. Reusable by the node tests.
- `reference_run` (session): an uninterrupted 1-rank and 2-rank reference per
  (world_size, steps, interval), computed once and shared.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from supervisor.launch.local_controller import free_port
from supervisor.titan.tinydata import TinyAssets, build_assets, debug_model_args

STEPS, INTERVAL = 10, 4  # small enough for CI, enough to kill between commits


def checkpoint_args(folder: str | Path, load_step: int | None = None) -> list[str]:
    """The checkpoint flags `supervise node` passes (retention off: ours)."""
    args = ["--checkpoint.enable", "--checkpoint.folder", str(folder), "--checkpoint.keep_latest_k", "0"]
    return args + (["--checkpoint.load_step", str(load_step)] if load_step is not None else [])


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal `pid` and every descendant (torchrun puts workers in new sessions,
    so a process-group kill alone would leave them running)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@dataclass
class TitanRun:
    """One `torchrun -m supervisor.titan.train` process tree."""

    proc: subprocess.Popen
    run_dir: Path
    log_path: Path
    env: dict = field(repr=False, default_factory=dict)

    def heartbeat_steps(self) -> dict[int, int]:
        from supervisor.contract.runtime import HEARTBEAT_DIR, read_json

        out = {}
        for p in (self.run_dir / HEARTBEAT_DIR).glob("rank-*.json"):
            hb = read_json(p)
            if hb:
                out[int(hb["rank"])] = int(hb["step"])
        return out

    def wait_step(self, step: int, timeout: float = 240) -> None:
        """Until rank 0 reports `step` done (or the run ends, which fails)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.heartbeat_steps().get(0, -1) >= step:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"trainer exited rc={self.proc.returncode} before step {step}\n{self.tail()}")
            time.sleep(0.05)
        raise AssertionError(f"no step {step} within {timeout} s\n{self.tail()}")

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"trainer did not finish within {timeout} s\n{self.tail()}")

    def kill(self) -> None:
        kill_tree(self.proc.pid)
        self.proc.wait()

    def outcome(self) -> dict | None:
        from supervisor.contract.runtime import OUTCOME_FILE, read_json

        return read_json(self.run_dir / OUTCOME_FILE)

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start_trainer(args: list[str], run_dir: Path, nproc: int = 1, env: dict | None = None,
                  log_name: str = "trainer.log") -> TitanRun:
    """Start the supervised trainer under real torchrun on CPU (gloo)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "SUPERVISE_RUN_DIR": str(run_dir), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "supervisor.titan.train", *args]
    log_path = run_dir / log_name
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    return TitanRun(proc, run_dir, log_path, full_env)


@pytest.fixture(scope="session")
def titan_assets(tmp_path_factory) -> TinyAssets:
    return build_assets(tmp_path_factory.mktemp("titan_assets"))


@pytest.fixture(scope="session")
def titan_args(titan_assets):
    """Callable: titan_args(dump_folder, **kw) -> TorchTitan argv list."""
    return functools.partial(debug_model_args, titan_assets)


@dataclass
class Reference:
    """An uninterrupted run: where its checkpoints are, its losses, its final tensors."""

    checkpoints: Path
    dump_folder: Path
    losses: dict[int, float]
    final: dict


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, titan_args):
    """Callable: reference_run(nproc, steps=STEPS, interval=INTERVAL) -> Reference (cached)."""
    from supervisor.titan.results import load_tensors, read_losses, step_path

    cache: dict[tuple, Reference] = {}

    def get(nproc: int, steps: int = STEPS, interval: int = INTERVAL) -> Reference:
        key = (nproc, steps, interval)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"titan_ref_{nproc}r")
            ckpt = root / "ckpt"
            run = start_trainer([*titan_args(root / "dump", steps=steps, checkpoint_interval=interval),
                                 *checkpoint_args(ckpt)], root / "run", nproc=nproc,
                                env={"SUPERVISE_CHECKPOINTS": str(ckpt)})
            assert run.wait() == 0, run.tail()
            cache[key] = Reference(ckpt, root / "dump", read_losses(root / "dump"),
                                   load_tensors(step_path(str(ckpt), steps), model_only=False))
        return cache[key]

    return get
