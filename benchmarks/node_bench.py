"""Node wrapper benchmark (issue 4), measured side by side in one run on this machine:

1. steps lost per preemption, with and without notice, `supervise node` vs plain
   TorchTitan (its own train.main under torchrun) under the same kills;
2. wrapper overhead on a restart, side by side: start -> first training step under
   `supervise node` vs plain torchrun running the very command (and environment)
   the wrapper would run, alternated; the difference as a fraction of the wrapper's
   start -> first step, plus the wrapper's own start -> command handed to torchrun
   (`wrapper_overhead_s` in the ledger; torchrun imports torch meanwhile). Where
   the machine's noise exceeds the difference, the wrapper's critical path measured
   directly: how long after `supervise` its torchrun started (less a bare
   interpreter's start), its import of torch beside the working wrapper (less the
   same import alone), and how long it then waited for its command (the ledger's
   `trainer_ready`: `torchrun_started_at`, `torchrun_import_s`, `torchrun_waited_s`);
3. notice -> committed checkpoint, vs the DCP save time alone.

Checkpoints go to a local SeaweedFS S3 server. Numbers are printed and written to
benchmarks/results/node_bench.json.

    OMP_NUM_THREADS=1 python benchmarks/node_bench.py [--steps 20] [--interval 5] [--kill-at 8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from supervisor.contract.exitcodes import ExitCode  # noqa: E402
from supervisor.launch.local_controller import free_port  # noqa: E402
from supervisor.contract.runtime import heartbeat_steps, ledger_url  # noqa: E402
from supervisor.store.local_server import LocalObjectStore  # noqa: E402
from supervisor.titan import cpu_compat  # noqa: E402
from supervisor.titan.tinydata import build_assets, debug_model_args  # noqa: E402

SUPERVISE = str(Path(sys.executable).parent / "supervise")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
STEP_RE = re.compile(r"step:\s+(\d+)")


def wait_for(predicate, timeout=300.0, interval=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def vanish(procs: list[psutil.Process]) -> None:
    """SIGKILL every process at once, like a VM going away."""
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)


def heartbeat_step(run_dir: Path) -> int:
    return max(heartbeat_steps(run_dir).values(), default=0)


def first_beat(run_dir: Path) -> float:
    return min(f.stat().st_mtime for f in (run_dir / "heartbeat").glob("rank-*.json"))


def log_step(log: Path) -> int:
    found = STEP_RE.findall(log.read_text(errors="replace")) if log.exists() else []
    return int(found[-1]) if found else 0


def bare_torchrun_start() -> tuple[float, float]:
    """A bare interpreter's start to its first line, and its import of torch.distributed.run
    alone on the machine: what plain torchrun pays before its `main`."""
    t0 = time.time()
    code = "import time; t = time.time(); import torch.distributed.run; print(t, time.time() - t)"
    first, imported = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split())
    return first - t0, imported


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="node-bench-"))
        self.assets = build_assets(self.work / "assets")
        self.store = LocalObjectStore(self.work / "s3").start()
        os.environ.update(self.store.env)  # this process reads the store too (plain baseline)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def close(self):
        self.store.stop()

    def titan_args(self, dump: Path) -> list[str]:
        return debug_model_args(self.assets, dump, steps=self.args.steps, checkpoint_interval=self.args.interval)

    # --- supervise node ---------------------------------------------------------

    def start_node(self, url: str, run_dir: Path, log: Path) -> subprocess.Popen:
        argv = [SUPERVISE, "node", "--checkpoints", url, "--run-dir", str(run_dir), "--cloud", "none",
                "--master-port", str(free_port()), "--", *self.titan_args(self.work / "dump")]  # fmt: skip
        return subprocess.Popen(argv, env=self.env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip

    def resume_step(self, url: str) -> int:
        out = subprocess.run([SUPERVISE, "node", "--dry-run", "--json", "--checkpoints", url, "--",
                              *self.titan_args(self.work / "dump")], env=self.env, capture_output=True, text=True)  # fmt: skip
        return json.loads(out.stdout)["resume_step"] or 0

    def supervised_loss(self, notice: bool) -> dict:
        url = self.store.url(f"sup-{uuid.uuid4().hex[:8]}")
        run_dir = self.work / f"run-{uuid.uuid4().hex[:6]}"
        log = self.work / "supervised.log"
        proc = self.start_node(url, run_dir, log)
        wait_for(lambda: heartbeat_step(run_dir) >= self.args.kill_at)
        at = heartbeat_step(run_dir)
        if notice:
            os.killpg(proc.pid, signal.SIGTERM)
            code = proc.wait(300)
            assert code == ExitCode.PREEMPTED_SAVED, f"exit {code}, see {log}"
            at = max(at, heartbeat_step(run_dir))  # steps finished before the save began
        else:
            vanish(tree(proc.pid))
        resumed = self.resume_step(url)
        return {"stopped_after_step": at, "resumes_from": resumed, "steps_lost": max(0, at - resumed)}

    def plain_restart(self, url: str, run_dir: Path, log: Path) -> float:
        """Start -> first step of plain torchrun on the command `supervise node` would run now."""
        out = subprocess.run([SUPERVISE, "node", "--dry-run", "--json", "--checkpoints", url, "--master-port",
                              str(free_port()), "--", *self.titan_args(self.work / "dump")],
                             env=self.env, capture_output=True, text=True, check=True)  # fmt: skip
        plan = json.loads(out.stdout)
        env = {**self.env, **plan["env"], "SUPERVISE_RUN_DIR": str(run_dir), "SUPERVISE_INCARNATION": run_dir.name}
        t0 = time.time()
        proc = subprocess.Popen(plan["command"], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        wait_for(lambda: heartbeat_step(run_dir) >= 1)
        first = first_beat(run_dir) - t0
        vanish(tree(proc.pid))
        return first

    # --- plain TorchTitan ---------------------------------------------------------

    def plain_loss(self, notice: bool) -> dict:
        import fsspec

        url = self.store.url(f"plain-{uuid.uuid4().hex[:8]}")
        log = self.work / f"plain-{uuid.uuid4().hex[:6]}.log"
        argv = [TORCHRUN, "--nnodes", "1", "--nproc_per_node", "1", "--node_rank", "0",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(REPO / "benchmarks/node_plain_titan.py"),
                *self.titan_args(self.work / "dump"), *cpu_compat.cpu_args(1),
                "--checkpoint.enable", "--checkpoint.folder", url, "--checkpoint.keep_latest_k", "0"]  # fmt: skip
        proc = subprocess.Popen(argv, env=self.env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        wait_for(lambda: log_step(log) >= self.args.kill_at)
        at = log_step(log)
        procs = tree(proc.pid)
        if notice:  # what SkyPilot / Kubernetes deliver: SIGTERM to the job's processes
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                pass
            at = max(at, log_step(log))
        vanish(procs)
        fs, path = fsspec.core.url_to_fs(url, **{"client_kwargs": {"endpoint_url": self.store.endpoint}})
        steps = [int(m.group(1)) for p in fs.glob(f"{path}/step-*/.metadata") if (m := re.search(r"step-(\d+)", p))]
        resumed = max(steps, default=0)  # TorchTitan's own load_step -1 choice
        return {"stopped_after_step": at, "resumes_from": resumed, "steps_lost": max(0, at - resumed)}

    # --- overhead and notice -> commit ---------------------------------------------

    def overhead_and_notice(self) -> dict:
        from supervisor.ledger.journal import read_events

        url = self.store.url(f"ovh-{uuid.uuid4().hex[:8]}")
        log = self.work / "overhead.log"
        # First incarnation: train past a periodic checkpoint, then a notice.
        run_dir = self.work / "ovh-run-1"
        proc = self.start_node(url, run_dir, log)
        wait_for(lambda: heartbeat_step(run_dir) >= self.args.kill_at)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(300)
        # Restarts, alternated: supervise node vs plain torchrun on the command it would run.
        node_first, plain_first, node_t0, bare = [], [], [], []
        for i in range(self.args.restarts):
            run_dir = self.work / f"ovh-run-{i + 2}"
            t0 = time.time()
            proc = self.start_node(url, run_dir, log)
            node_t0.append(t0)
            wait_for(lambda: heartbeat_step(run_dir) >= 1)
            node_first.append(first_beat(run_dir) - t0)
            vanish(tree(proc.pid))
            plain_first.append(self.plain_restart(url, self.work / f"ovh-plain-{i + 2}", log))
            bare.append(bare_torchrun_start())
        events, _ = read_events(ledger_url(url))
        events.sort(key=lambda e: e.t)
        handed = [e.get("wrapper_overhead_s") for e in events if e.kind == "trainer_start"][1:]  # restarts only
        node_s, plain_s = statistics.median(node_first), statistics.median(plain_first)
        # The wrapper on the critical path, measured directly rather than as the
        # difference of two noisy totals: the prestarted torchrun's start after the
        # wrapper's (vs a bare interpreter's first line), its import of torch while
        # the wrapper works beside it (vs alone), and its wait for the command.
        ready = [e for e in events if e.kind == "trainer_ready" and e.get("torchrun_started_at")][1:]
        prespawn = statistics.median(e.get("torchrun_started_at") - t0 for e, t0 in zip(ready, node_t0))
        imported = statistics.median(e.get("torchrun_import_s") for e in ready)
        waited = statistics.median(e.get("torchrun_waited_s") for e in ready)
        bare_first, bare_import = (statistics.median(x) for x in zip(*bare))
        critical = (prespawn - bare_first) + (imported - bare_import) + waited
        notice = next((e for e in events if e.kind == "notice"), None)
        committed = next((e for e in events if notice and e.kind == "checkpoint_committed" and e.t >= notice.t), None)
        saves = [e.get("duration_s") for e in events if e.kind == "checkpoint_saved" and e.get("duration_s") is not None]
        notice_t = notice.get("received_at", notice.t) if notice else None
        notice_save = next((e.get("duration_s") for e in events
                            if notice and e.kind == "checkpoint_saved" and e.t >= notice_t), None)  # fmt: skip
        return {
            "restart_first_step_s_supervised": node_s,
            "restart_first_step_s_plain_torchrun": plain_s,
            "restart_overhead_s": node_s - plain_s,
            "restart_overhead_fraction": (node_s - plain_s) / node_s,
            "restarts_s_supervised": node_first,  # in the order run, alternated with plain
            "restarts_s_plain_torchrun": plain_first,
            "wrapper_start_to_command_s": statistics.median(handed) if handed else None,
            "torchrun_started_after_wrapper_s": prespawn,
            "python_first_line_s": bare_first,
            "torchrun_import_s_beside_wrapper": imported,
            "torchrun_import_s_alone": bare_import,
            "torchrun_waited_for_command_s": waited,
            "wrapper_critical_path_s": critical,
            "wrapper_critical_path_fraction": critical / node_s,
            "restarts_measured": len(node_first),
            "notice_to_commit_s": (committed.t - notice_t) if committed else None,
            "notice_dcp_save_s": notice_save,
            "dcp_save_s_median": statistics.median(saves) if saves else None,
            "dcp_saves_measured": len(saves),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--interval", type=int, default=5)
    ap.add_argument("--kill-at", type=int, default=8, help="stop the run once this step is done")
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/node_bench.json"))
    args = ap.parse_args()
    bench = Bench(args)
    try:
        results = {
            "setup": {"steps": args.steps, "checkpoint_interval": args.interval, "kill_after_step": args.kill_at,
                      "ranks": 1, "device": "cpu", "store": "seaweedfs (loopback S3)"},  # fmt: skip
            "steps_lost": {
                "supervise_with_notice": bench.supervised_loss(notice=True),
                "supervise_without_notice": bench.supervised_loss(notice=False),
                "plain_torchtitan_with_notice": bench.plain_loss(notice=True),
                "plain_torchtitan_without_notice": bench.plain_loss(notice=False),
            },
            **bench.overhead_and_notice(),
        }
    finally:
        bench.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
