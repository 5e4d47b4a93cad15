"""The local backend: a SkyPilot managed job emulated on this machine.

Each of a job's N "nodes" is a process group running the very `supervise node
-- ...` command SkyPilot would run, with the same SKYPILOT_* environment. A
detached controller (supervisor.launch.local_controller) watches them and
recovers like a managed job: any node lost or exiting with a recover code
restarts *all* nodes on a fresh rendezvous port. Everything lives in
`$SUPERVISE_HOME/local/<name>/`, so status, logs and stop work from any
terminal after the launching CLI has exited:

    job.json        what to run (LocalJob) — written once at launch
    state.json      the controller's view: state, recoveries, reason, pids, step
    cancel.json     a stop request (graceful or not), read by the controller
    job.log         the controller's own lines (starts, exits, recoveries, chaos)
    node-R.log      node R's output, appended across incarnations
    run/<inc>/node-R/  $SUPERVISE_RUN_DIR of node R in incarnation <inc>
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from supervisor import registry
from supervisor.errors import SuperviseError
from supervisor.exitcodes import ExitCode
from supervisor.launch.base import JobStatus
from supervisor.runtime import read_json, write_json_atomic

BACKEND = "local"
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
CONTROLLER_START_S = 60.0  # a controller that has not written its pid by then never started
NOTICE_IN = "chaos-notice.json"  # in a node's run dir; handed to `supervise node --notice-file`


@dataclass
class LocalJob:
    """Everything the controller needs; plain data so it survives as JSON."""

    name: str
    node_argv: list[str]  # the per-node command, e.g. ["supervise", "node", "--checkpoints", URL, "--", ...]
    num_nodes: int = 1
    gpus_per_node: int = 1  # SKYPILOT_NUM_GPUS_PER_NODE (ranks per node on CPU)
    checkpoints_url: str | None = None
    max_restarts_on_errors: int = 0
    recover_on_exit_codes: list[int] = field(default_factory=lambda: [int(ExitCode.PREEMPTED_SAVED)])
    env: dict[str, str] = field(default_factory=dict)  # extra environment (store credentials, ...)
    chaos: list[dict] = field(default_factory=list)  # ChaosEvent dicts
    graceful_timeout_s: float = 120.0  # stop: time for the nodes to save and commit
    peer_grace_s: float = 60.0  # after one node exits cleanly, time for the others to follow
    submitted_at: float = 0.0  # UTC epoch

    @property
    def ledger_url(self) -> str | None:
        return f"{self.checkpoints_url.rstrip('/')}/_ledger" if self.checkpoints_url else None


# ---- pure logic ----------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    action: str  # "finish" | "recover" | "fail"
    counts: bool  # uses one of max_restarts_on_errors
    reason: str


def _signame(code: int) -> str:
    import signal

    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def decide(
    codes: dict[int, int | None],
    *,
    num_nodes: int,
    errors_so_far: int,
    max_restarts_on_errors: int,
    recover_on_exit_codes: list[int] | tuple[int, ...],
) -> Decision:
    """What a managed job does after an incarnation ended.

    `codes` maps node rank -> its wrapper's return code (negative: killed by that
    signal; None or absent: still running when the controller tore it down).
    Order matters: a user error anywhere fails fast; a lost node is a
    preemption (free, like SkyPilot's cluster recovery); a code listed in
    recover_on_exit_codes recovers regardless of the error budget (SkyPilot
    semantics) except RETRYABLE, which always spends the budget so that a crash
    or hang loop ends; anything else spends the budget.
    """
    ranks = range(num_nodes)
    exited = {r: c for r, c in codes.items() if c is not None}
    if len(exited) == num_nodes and all(c == 0 for c in exited.values()):
        return Decision("finish", False, "all nodes finished")
    user = [r for r in ranks if exited.get(r) == ExitCode.USER_ERROR]
    if user:
        return Decision("fail", False, f"user/config error: node {user[0]} exited {int(ExitCode.USER_ERROR)}; not retried")
    lost = [r for r in ranks if (exited.get(r) or 0) < 0]
    if lost:
        return Decision("recover", False, f"node {lost[0]} lost ({_signame(exited[lost[0]])})")
    free = [r for r in ranks if exited.get(r) in recover_on_exit_codes and exited.get(r) != ExitCode.RETRYABLE]
    if free:
        code = exited[free[0]]
        why = "preempted, state saved" if code == ExitCode.PREEMPTED_SAVED else "in recover_on_exit_codes"
        return Decision("recover", False, f"node {free[0]} exited {code} ({why})")
    failed = [r for r in ranks if exited.get(r) not in (None, 0)]
    if failed:
        code = exited[failed[0]]
        what = f"node {failed[0]} exited {code}" + (" (retryable)" if code == ExitCode.RETRYABLE else "")
    else:
        stuck = [r for r in ranks if r not in exited]
        what = f"node {stuck[0]} did not exit after its peers finished"
    if errors_so_far < max_restarts_on_errors:
        return Decision("recover", True, f"{what}; restart {errors_so_far + 1} of {max_restarts_on_errors} on errors")
    return Decision("fail", True, f"{what}; max_restarts_on_errors={max_restarts_on_errors} used up")


def node_argv_for(argv: list[str], *, master_port: int, notice_file: Path) -> list[str]:
    """The job's node command with two local-only options after `node`: a fresh
    rendezvous port (jobs and incarnations share one loopback; SkyPilot's nodes
    each have their own) and the notice file chaos writes (the stand-in for a
    cloud's metadata server)."""
    if "node" not in argv:
        return list(argv)
    i = argv.index("node") + 1
    return [*argv[:i], "--master-port", str(master_port), "--notice-file", str(notice_file), *argv[i:]]


def node_env(job: LocalJob, *, rank: int, incarnation: int, run_dir: Path, task_id: str) -> dict[str, str]:
    """The environment SkyPilot gives node `rank`, plus the supervise runtime names."""
    from supervisor.launch.procs import ENV_TAG, tag
    from supervisor.runtime import ENV_CHECKPOINTS, ENV_INCARNATION, ENV_LEDGER, ENV_RUN_DIR

    env = {
        "SKYPILOT_NUM_NODES": str(job.num_nodes),
        "SKYPILOT_NODE_RANK": str(rank),
        "SKYPILOT_NODE_IPS": "\n".join(["127.0.0.1"] * job.num_nodes),
        "SKYPILOT_NUM_GPUS_PER_NODE": str(job.gpus_per_node),
        "SKYPILOT_TASK_ID": task_id,
        ENV_RUN_DIR: str(run_dir),
        ENV_INCARNATION: str(incarnation),
        ENV_TAG: tag(job.name, incarnation, rank),
    }
    if job.checkpoints_url:
        env[ENV_CHECKPOINTS] = job.checkpoints_url
        env[ENV_LEDGER] = job.ledger_url
    return env


# ---- files -------------------------------------------------------------------


def job_dir(name: str) -> Path:
    return registry.home() / "local" / name


def read_state(name: str) -> dict | None:
    return read_json(job_dir(name) / "state.json")


def controller_alive(state: dict | None) -> bool:
    import psutil

    pid = (state or {}).get("controller_pid")
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and "local_controller" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _load_job(name: str) -> LocalJob:
    data = read_json(job_dir(name) / "job.json")
    if data is None:
        raise SuperviseError(f"no local job called {name!r} (see `supervise status`)")
    return LocalJob(**data)


def job_from_spec(spec, *, name: str) -> LocalJob:
    """A JobSpec, run the way SkyPilot would run it, as a LocalJob.

    There are no bucket mounts here, so the nodes write checkpoints straight
    through the S3 API (checkpoint mode DIRECT)."""
    from supervisor.spec import node_argv

    if spec.checkpoint.mode != "DIRECT":
        spec = spec.model_copy(deep=True)
        spec.checkpoint.mode = "DIRECT"
    return LocalJob(
        name=name,
        node_argv=node_argv(spec),
        num_nodes=spec.num_nodes,
        gpus_per_node=spec.gpus_per_node,
        checkpoints_url=spec.checkpoints_url,
        max_restarts_on_errors=spec.recovery.max_restarts_on_errors,
        recover_on_exit_codes=list(spec.recovery.recover_on_exit_codes),
        env=spec.env,
    )


class LocalLauncher:
    """Launcher for the local backend; see the module docstring."""

    backend = BACKEND

    def launch(self, spec, *, name: str) -> str:
        return self.launch_job(job_from_spec(spec, name=name))

    def launch_job(self, job: LocalJob) -> str:
        """Start the detached controller for `job`; returns its job id at once."""
        folder = job_dir(job.name)
        old = read_state(job.name)
        if old and old.get("state") not in TERMINAL and controller_alive(old):
            raise SuperviseError(f"local job {job.name!r} is still {old['state']}; `supervise stop {job.name}` first")
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        job.submitted_at = job.submitted_at or time.time()
        job_id = f"local-{job.name}-{int(job.submitted_at)}"
        write_json_atomic(folder / "job.json", asdict(job))
        write_json_atomic(folder / "state.json", {"state": "PENDING", "job_id": job_id, "recoveries": 0})
        registry.record(job.name, backend=BACKEND, checkpoints_url=job.checkpoints_url or "", job_id=job_id, state_dir=str(folder))
        log = open(folder / "controller.out", "ab")
        # Double fork through a throwaway interpreter: the controller gets its own
        # session and init (not this CLI) as its parent, so it outlives us cleanly.
        spawner = (
            "import subprocess,sys;"
            "subprocess.Popen(sys.argv[1:],start_new_session=True,stdin=subprocess.DEVNULL,stdout=sys.stdout,stderr=sys.stdout)"
        )
        subprocess.run(
            [sys.executable, "-c", spawner, sys.executable, "-m", "supervisor.launch.local_controller", str(folder)],
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
            env={**os.environ, **job.env},
        )
        log.close()
        return job_id

    def status(self, name: str | None = None) -> list[JobStatus]:
        root = registry.home() / "local"
        names = [name] if name else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        out = []
        for n in names:
            state = read_state(n)
            if state is None:
                if name:
                    raise SuperviseError(f"no local job called {name!r} (see `supervise status`)")
                continue
            job = read_json(job_dir(n) / "job.json") or {}
            current, reason = state.get("state", "PENDING"), state.get("reason")
            stuck = current == "PENDING" and time.time() - job.get("submitted_at", time.time()) > CONTROLLER_START_S
            if current not in TERMINAL and (current != "PENDING" or stuck) and not controller_alive(state):
                current, reason = "FAILED", "the local controller died (see controller.out in the job folder)"
            out.append(
                JobStatus(
                    name=n,
                    backend=BACKEND,
                    state=current,
                    recoveries=state.get("recoveries", 0),
                    job_id=state.get("job_id"),
                    reason=reason,
                    checkpoints_url=job.get("checkpoints_url"),
                )
            )
        return out

    def logs(self, name: str, *, follow: bool = False) -> None:
        """Print the controller's lines, then each node's output; `follow` keeps
        printing new lines until the job is over."""
        folder = job_dir(name)
        _load_job(name)
        offsets: dict[Path, int] = {}
        while True:
            for path in [folder / "job.log", *sorted(folder.glob("node-*.log"))]:
                prefix = "" if path.name == "job.log" else f"({path.stem}) "
                try:
                    with open(path, "rb") as f:
                        f.seek(offsets.get(path, 0))
                        chunk = f.read()
                except OSError:
                    continue
                complete = chunk.rfind(b"\n") + 1 if follow else len(chunk)
                offsets[path] = offsets.get(path, 0) + complete
                for line in chunk[:complete].decode(errors="replace").splitlines():
                    sys.stdout.write(f"{prefix}{line}\n")
            sys.stdout.flush()
            if not follow:
                return
            st = self.status(name)[0]
            if st.state in TERMINAL:
                follow = False  # one last pass prints whatever is left
                continue
            time.sleep(0.5)

    def cancel(self, name: str, *, graceful: bool = True, timeout_s: float | None = None) -> JobStatus:
        """Ask the controller to stop the job and wait until it has: nodes SIGTERMed so
        they save and commit (graceful), then killed; no process left."""
        from supervisor.launch.procs import kill_tagged

        job = _load_job(name)
        state = read_state(name) or {}
        if state.get("state") in TERMINAL:
            return self.status(name)[0]
        write_json_atomic(job_dir(name) / "cancel.json", {"graceful": graceful, "time": time.time()})
        limit = (timeout_s if timeout_s is not None else job.graceful_timeout_s) + 30.0
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            state = read_state(name) or {}
            if state.get("state") in TERMINAL and not controller_alive(state):
                break
            if state.get("state") != "PENDING" and not controller_alive(state):
                break
            time.sleep(0.2)
        if controller_alive(state):
            import psutil

            psutil.Process(state["controller_pid"]).kill()
        kill_tagged(f"{name}/")
        state = read_state(name) or {}
        if state.get("state") not in TERMINAL:
            state.update(state="CANCELLED", reason=state.get("reason") or "stopped by the user")
            write_json_atomic(job_dir(name) / "state.json", state)
        return self.status(name)[0]

    def forget(self, name: str) -> None:
        """Remove a finished job's folder and registry entry (the demo cleans up after itself)."""
        state = read_state(name)
        if state and state.get("state") not in TERMINAL and controller_alive(state):
            raise SuperviseError(f"local job {name!r} is still {state['state']}; stop it first")
        shutil.rmtree(job_dir(name), ignore_errors=True)
        (registry.home() / "jobs" / f"{name}.json").unlink(missing_ok=True)

    def wait(self, name: str, *, timeout_s: float = 3600.0, poll_s: float = 0.5) -> JobStatus:
        """Block until the job is over (for the demo and tests)."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.status(name)[0]
            if st.state in TERMINAL:
                return st
            if time.monotonic() > deadline:
                raise SuperviseError(f"local job {name!r} still {st.state} after {timeout_s:.0f} s")
            time.sleep(poll_s)
