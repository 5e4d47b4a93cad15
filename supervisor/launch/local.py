"""The local backend: a SkyPilot managed job emulated on this machine.

Each of a job's N "nodes" is a process group running the task's node command
with the SKYPILOT_* environment SkyPilot gives it, in its own node directory
(its working directory, where setup ran once before the first incarnation,
as SkyPilot runs `setup` before `run`). A detached controller
(supervisor.launch.local_controller) watches them and recovers like a managed
job: a node lost is a preemption and always recovers; otherwise SkyPilot's
own restart rule decides (`RestartRule`, a copy of its
`should_restart_on_failure`), and all nodes restart on a fresh rendezvous
port. Everything lives in `$SUPERVISE_HOME/local/<name>/`, so status, logs and
stop work from any terminal after the launching CLI has exited:

    job.json        what to run (LocalJob, the request) — written once at schedule
    state.json      the controller's view: state, recoveries, reason, pids, step
    cancel.json     the cancel (after `stop`'s request in the bucket), read by the controller
    job.log         the controller's own lines (setup, starts, exits, recoveries, chaos)
    node-R.log      node R's output (setup, then every incarnation)
    nodes/node-R/   node R's working directory (setup's relative paths land here)
    run/<inc>/node-R/  $SUPERVISE_RUN_DIR of node R in incarnation <inc>
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from supervisor import registry
from supervisor.contract.node import NodeOptions
from supervisor.errors import SuperviseError
from supervisor.contract.exitcodes import ExitCode
from supervisor.launch.base import CANCELLED, FAILED, PENDING, AlreadyFinished, JobStatus, is_terminal
from supervisor.contract.runtime import read_json, write_json_atomic

BACKEND = "local"
CONTROLLER_START_S = 60.0  # a controller that has not written its pid by then never started
NOTICE_IN = "chaos-notice.json"  # in a node's run dir; handed to `supervise node --notice-file`
# SkyPilot gives a node that was force-cancelled after a peer failed this code
# (sky/backends/task_codegen.py, get_or_fail: "SIGKILL=128+9").
CANCELLED_RETURN_CODE = 137


@dataclass
class LocalJob:
    """The local backend's request: everything the controller needs, as plain JSON data."""

    name: str
    node_argv: list[str]  # the per-node command, e.g. ["supervise", "node", "--checkpoints", URL, "--", ...]
    setup: str = ""  # bash, run once in each node directory before the first incarnation
    num_nodes: int = 1
    # SKYPILOT_NUM_GPUS_PER_NODE, as SkyPilot sets it: the task's accelerator count, 0 for a
    # CPU task (sky/backends/task_codegen.py, RayCodeGen._add_ray_task, SlurmCodeGen.add_task).
    # A CPU job's ranks per node travel in its node command (--nproc-per-node), as on SkyPilot.
    gpus_per_node: int = 0
    checkpoints_url: str | None = None
    ledger_url: str | None = None
    max_restarts_on_errors: int = 0
    recover_on_exit_codes: list[int] = field(default_factory=lambda: [int(ExitCode.PREEMPTED_SAVED)])
    env: dict[str, str] = field(default_factory=dict)  # the task's envs
    chaos: list[dict] = field(default_factory=list)  # ChaosEvent dicts
    # stop: the least wait for the nodes to save and commit; beyond it, as long as this
    # run's measured saves need (notices.SaveWait), not a fixed budget
    graceful_timeout_s: float = 120.0
    peer_grace_s: float = 60.0  # after one node exits cleanly, time for the others to follow
    submitted_at: float = 0.0  # UTC epoch
    missing_secrets: list[str] = field(default_factory=list)  # names of task secrets this shell lacks

    def render(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


# ---- pure logic ----------------------------------------------------------------


class RestartRule:
    """SkyPilot 0.14.1's restart rule, copied literally: `StrategyExecutor.
    should_restart_on_failure` in sky/jobs/recovery_strategy.py (same attribute
    names, same counter; its logger calls dropped). One instance lives for the whole job, like the
    executor of a managed job."""

    def __init__(self, max_restarts_on_errors: int, recover_on_exit_codes: list[int] | None = None):
        self.max_restarts_on_errors = max_restarts_on_errors
        self.recover_on_exit_codes = recover_on_exit_codes or []
        self.restart_cnt_on_failure = 0

    def should_restart_on_failure(self, exit_codes: list[int] | None = None) -> bool:
        # Check if any exit code matches the configured recover_on_exit_codes
        # This triggers recovery without incrementing the counter
        if exit_codes and self.recover_on_exit_codes:
            for exit_code in exit_codes:
                if exit_code in self.recover_on_exit_codes:
                    return True

        # Otherwise, check the max_restarts_on_errors counter
        self.restart_cnt_on_failure += 1
        if self.restart_cnt_on_failure > self.max_restarts_on_errors:
            return False
        return True


@dataclass(frozen=True)
class Decision:
    action: str  # "finish" | "recover" | "fail"
    reason: str


def _signame(code: int) -> str:
    import signal

    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def skypilot_exit_codes(codes: dict[int, int | None], num_nodes: int) -> list[int]:
    """The exit-code list SkyPilot would hand `should_restart_on_failure`: one per
    node in rank order, a node still running when its peers ended counted as
    force-cancelled (137), as sky/backends/task_codegen.py's get_or_fail does."""
    return [CANCELLED_RETURN_CODE if codes.get(r) is None else int(codes[r]) for r in range(num_nodes)]


_MEANING = {int(ExitCode.PREEMPTED_SAVED): "preempted, state saved", int(ExitCode.RETRYABLE): "retryable",
            int(ExitCode.USER_ERROR): "user/config error"}


def decide(codes: dict[int, int | None], *, num_nodes: int, rule: RestartRule) -> Decision:
    """What a managed job does after an incarnation ended.

    `codes` maps node rank -> its wrapper's return code (negative: its process
    group was killed by that signal, the emulator's stand-in for a VM that is
    gone; None or absent: still running when the controller tore it down).
    A lost node is a preemption: SkyPilot's controller sees the cluster not UP
    and recovers without consulting the exit codes (sky/jobs/controller.py).
    Otherwise all nodes' codes go through SkyPilot's rule, which counts on `rule`.
    """
    exited = {r: c for r, c in codes.items() if c is not None}
    if len(exited) == num_nodes and all(c == 0 for c in exited.values()):
        return Decision("finish", "all nodes finished")
    lost = [r for r in range(num_nodes) if (exited.get(r) or 0) < 0]
    if lost:
        return Decision("recover", f"node {lost[0]} lost ({_signame(exited[lost[0]])}): a preemption, recovered")
    exit_codes = skypilot_exit_codes(codes, num_nodes)
    first = next((r for r, c in enumerate(exit_codes) if c != 0), 0)
    code = exit_codes[first]
    what = f"node {first} exited {code}" + (f" ({_MEANING[code]})" if code in _MEANING else "")
    if code == CANCELLED_RETURN_CODE and codes.get(first) is None:
        what = f"node {first} did not exit after its peers ended"
    if rule.should_restart_on_failure(exit_codes):
        matched = [c for c in exit_codes if c in rule.recover_on_exit_codes]
        if matched:
            return Decision("recover", f"{what}; exit code(s) {matched} in recover_on_exit_codes "
                                       f"{rule.recover_on_exit_codes}")
        return Decision("recover", f"{what}; restart {rule.restart_cnt_on_failure} of "
                                   f"{rule.max_restarts_on_errors} on errors")
    return Decision("fail", f"{what}; not in recover_on_exit_codes {rule.recover_on_exit_codes}, "
                            f"max_restarts_on_errors={rule.max_restarts_on_errors}: not retried")


def node_options_for(argv: list[str], *, master_port: int, notice_file: Path) -> NodeOptions:
    """The job's node command with two local-only options: a fresh rendezvous port
    (jobs and incarnations share one loopback; SkyPilot's nodes each have their
    own) and the notice file chaos writes (the stand-in for a cloud's metadata server)."""
    return replace(NodeOptions.from_argv(argv), master_port=master_port, notice_file=str(notice_file))


def node_env(job: LocalJob, *, rank: int, incarnation: int, run_dir: Path, task_id: str) -> dict[str, str]:
    """The environment SkyPilot gives node `rank`, plus the supervise runtime names."""
    from supervisor.launch.procs import ENV_TAG, tag
    from supervisor.contract.runtime import ENV_CHECKPOINTS, ENV_INCARNATION, ENV_LEDGER, ENV_RUN_DIR

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
    if job.ledger_url:
        env[ENV_LEDGER] = job.ledger_url
    return env


# ---- files -------------------------------------------------------------------


def job_dir(name: str) -> Path:
    return registry.home() / "local" / name


def node_dir(name: str, rank: int) -> Path:
    """Node `rank`'s working directory, kept across incarnations (its "disk")."""
    return job_dir(name) / "nodes" / f"node-{rank}"


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


class LocalBackend:
    """Backend for this machine; see the module docstring."""

    name = BACKEND

    def adapt(self, spec):
        """The nodes are this machine: no bucket mounts here, so checkpoints go
        straight through the S3 API (DIRECT), and the packages are the ones this
        command runs from (setup installs nothing; it still fetches/builds assets)."""
        if spec.checkpoint.mode == "DIRECT" and not spec.install.pip:
            return spec
        spec = spec.model_copy(deep=True)
        spec.checkpoint.mode = "DIRECT"
        spec.install.pip = False
        return spec

    def dryrun(self, task, *, chaos: list | tuple = (), graceful_timeout_s: float | None = None) -> LocalJob:
        job = LocalJob(name=task.name, node_argv=task.run.to_argv(), setup=task.setup, num_nodes=task.num_nodes,
                       gpus_per_node=task.ranks_per_node if task.resources.accelerators else 0,
                       checkpoints_url=task.checkpoints_url, ledger_url=task.ledger_url,
                       max_restarts_on_errors=task.restart.max_restarts_on_errors,
                       recover_on_exit_codes=list(task.restart.recover_on_exit_codes), env=dict(task.envs),
                       chaos=[ev.to_dict() for ev in chaos])
        if graceful_timeout_s is not None:
            job.graceful_timeout_s = graceful_timeout_s
        # Local nodes inherit this shell's environment: a secret must be in it.
        job.missing_secrets = [k for k in task.secrets if not os.environ.get(k)]
        return job

    def schedule(self, job: LocalJob) -> str:
        """Start the detached controller for `job`; returns its job id at once."""
        folder = job_dir(job.name)
        old = read_state(job.name)
        if old and not is_terminal(old.get("state")) and controller_alive(old):
            raise SuperviseError(f"local job {job.name!r} is still {old['state']}; `supervise stop {job.name}` first")
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        job.submitted_at = job.submitted_at or time.time()
        job_id = f"local-{job.name}-{int(job.submitted_at)}"
        write_json_atomic(folder / "job.json", asdict(job))
        write_json_atomic(folder / "state.json", {"state": PENDING, "job_id": job_id, "recoveries": 0})
        registry.record(job.name, backend=BACKEND, checkpoints_url=job.checkpoints_url or "", job_id=job_id, state_dir=str(folder))
        # Double fork through a throwaway interpreter: the controller gets its own
        # session and init (not this CLI) as its parent, so it outlives us cleanly.
        spawner = (
            "import subprocess,sys;"
            "subprocess.Popen(sys.argv[1:],start_new_session=True,stdin=subprocess.DEVNULL,stdout=sys.stdout,stderr=sys.stdout)"
        )
        with open(folder / "controller.out", "ab") as log:
            subprocess.run([sys.executable, "-c", spawner, sys.executable, "-m", "supervisor.launch.local_controller",
                            str(folder)], stdout=log, stderr=subprocess.STDOUT, check=True, env={**os.environ, **job.env})
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
            current, reason = state.get("state", PENDING), state.get("reason")
            stuck = current == PENDING and time.time() - job.get("submitted_at", time.time()) > CONTROLLER_START_S
            if not is_terminal(current) and (current != PENDING or stuck) and not controller_alive(state):
                current, reason = FAILED, "the local controller died (see controller.out in the job folder)"
            out.append(JobStatus(name=n, backend=BACKEND, state=current, recoveries=state.get("recoveries", 0),
                                 job_id=state.get("job_id"), reason=reason, checkpoints_url=job.get("checkpoints_url")))
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
            if is_terminal(st.state):
                follow = False  # one last pass prints whatever is left
                continue
            time.sleep(0.5)

    def cancel(self, name: str, *, graceful: bool = True):
        """Stop the job the way SkyPilotBackend.cancel does: graceful, the stop request in
        the bucket first (every node wrapper saves, commits and exits 0), waited for as
        long as this run's measured saves need, then the cancel (cancel.json: the
        controller kills whatever is left; no process remains). Graceful: returns what
        was saved (skypilot.StopResult); --now: None, cancelled at once."""
        from supervisor.launch.procs import kill_tagged
        from supervisor.launch.skypilot import (StopResult, clear_stop_request, nodes_exited, stop_result,
                                                wait_for_stop, write_stop_request)
        from supervisor.contract.layout import stop_request_url

        job = _load_job(name)
        state = read_state(name) or {}
        if is_terminal(state.get("state")):
            raise AlreadyFinished(f"local job {name} already finished: {state['state']}; nothing to stop")
        asked = time.monotonic()

        def over(_events=None) -> bool:
            st = read_state(name) or {}
            started = st.get("state") != PENDING or time.monotonic() - asked > CONTROLLER_START_S
            return not controller_alive(st) and (is_terminal(st.get("state")) or started)

        result, events, waited_out = None, [], None
        if graceful and not (job.checkpoints_url and job.ledger_url):
            result = StopResult(name, False, None, "the job has no checkpoint bucket for a stop request; "
                                                   "cancelled without a save")
        elif graceful and not state.get("nodes"):
            result = StopResult(name, False, None, f"the job is {state.get('state')}: no node is running to save; "
                                                   "cancelled")
        elif graceful:
            print(f"asking the nodes of {name} to save and stop ({stop_request_url(job.checkpoints_url)})",
                  file=sys.stderr, flush=True)
            write_stop_request(job.checkpoints_url)
            events, waited_out = wait_for_stop(name, job.ledger_url, lambda ev: over() or nodes_exited(ev),
                                               poll_s=1.0, floor_s=job.graceful_timeout_s)
        write_json_atomic(job_dir(name) / "cancel.json", {"graceful": False, "time": time.time()})
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and not over():
            time.sleep(0.2)
        state = read_state(name) or {}
        if controller_alive(state):
            import psutil

            psutil.Process(state["controller_pid"]).kill()
        kill_tagged(f"{name}/")
        if job.checkpoints_url:
            clear_stop_request(job.checkpoints_url)  # the next start under this name is not stopped
        state = read_state(name) or {}
        if not is_terminal(state.get("state")):
            state.update(state=CANCELLED, reason=state.get("reason") or "stopped by the user")
            write_json_atomic(job_dir(name) / "state.json", state)
        if not graceful or result is not None:
            return result
        if waited_out is None:  # the controller wrote the nodes' exits before it finished: read them all
            from supervisor.ledger.journal import read_events

            events = read_events(job.ledger_url)[0]
        return stop_result(name, events, job.checkpoints_url, waited_out=waited_out)

    def forget(self, name: str) -> None:
        """Remove a finished job's folder and registry entry (the demo cleans up after itself)."""
        state = read_state(name)
        if state and not is_terminal(state.get("state")) and controller_alive(state):
            raise SuperviseError(f"local job {name!r} is still {state['state']}; stop it first")
        shutil.rmtree(job_dir(name), ignore_errors=True)
        (registry.home() / "jobs" / f"{name}.json").unlink(missing_ok=True)

    def wait(self, name: str, *, timeout_s: float = 3600.0, poll_s: float = 0.5) -> JobStatus:
        """Block until the job is over (for the demo and tests)."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.status(name)[0]
            if is_terminal(st.state):
                return st
            if time.monotonic() > deadline:
                raise SuperviseError(f"local job {name!r} still {st.state} after {timeout_s:.0f} s")
            time.sleep(poll_s)
