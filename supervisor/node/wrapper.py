"""`supervise node`: turn SkyPilot's bare restart of `run` into a correct resume.

On every start: validate the trainer args, read the topology from SKYPILOT_*,
ask the catalog for the newest verified step, start torchrun (own session) with
the checkpoint flags rewritten, then watch three things until torchrun exits:
preemption notices (signals, file, cloud metadata), the ranks' heartbeats, and
torchrun itself. Whatever happens, no process it started survives it, and the
exit code says what the managed job should do next (supervisor.exitcodes).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.exitcodes import ExitCode
from supervisor.node import process
from supervisor.node.notices import Notice, NoticeWatcher, cloud_urls
from supervisor.node.resume import (
    ResumePlan,
    checkpoint_url,
    decide,
    ledger_url,
    rewrite_trainer_args,
    validate_trainer_args,
)
from supervisor.node.torchrun import DEFAULT_MASTER_PORT, DEFAULT_TRAINER_MODULE, Topology, topology_from_env, torchrun_argv
from supervisor.node.watchdog import Watchdog
from supervisor.runtime import (
    ENV_CHECKPOINTS,
    ENV_COMMIT_WAIT_S,
    ENV_INCARNATION,
    ENV_LEDGER,
    ENV_RESUME_STEP,
    ENV_RUN_DIR,
    HEARTBEAT_DIR,
    NOTICE_FILE,
    OUTCOME_FILE,
    heartbeat_steps,
    read_json,
    write_json_atomic,
)

log = logging.getLogger(__name__)

TICK_S = 0.25


@dataclass
class NodeOptions:
    checkpoints: str | None = None  # catalog URL; default from the trainer args
    checkpoint_mount: str | None = None  # where TorchTitan writes, when the bucket is mounted
    commit_wait_s: float = 0.0
    nproc_per_node: int | None = None
    master_port: int = DEFAULT_MASTER_PORT
    trainer_module: str = DEFAULT_TRAINER_MODULE
    run_dir: str | None = None  # default: $SUPERVISE_RUN_DIR, else a fresh temp folder
    incarnation: str | None = None
    notice_file: str | None = None
    cloud: str = "auto"
    metadata_urls: dict[str, str | None] = field(default_factory=dict)
    notice_poll_s: float = 5.0
    grace_s: float = 300.0  # wait after a notice without deadline before killing
    hang_timeout_s: float = 1800.0
    startup_timeout_s: float = 1800.0


@dataclass
class Plan:
    topology: Topology
    resume: ResumePlan
    command: list[str]
    env: dict[str, str]  # the SUPERVISE_* names added to the trainer's environment

    def describe(self) -> str:
        if self.resume.step is None:
            return f"fresh start: {self.resume.reason} under {self.resume.checkpoints}"
        return f"{self.resume.reason} (under {self.resume.checkpoints})"

    def as_json(self) -> dict:
        return {
            "command": self.command,
            "resume_step": self.resume.step,
            "resume": self.describe(),
            "checkpoints": self.resume.checkpoints,
            "skipped": [{"step": s, "reason": r} for s, r in self.resume.skipped],
            "topology": self.topology.as_dict(),
            "env": self.env,
        }


def make_plan(opts: NodeOptions, trainer_args: list[str], environ: dict[str, str] | None = None) -> Plan:
    """Everything decided before a process starts (also what --dry-run prints)."""
    environ = dict(os.environ if environ is None else environ)
    validate_trainer_args(trainer_args)
    topo = topology_from_env(environ, nproc_per_node=opts.nproc_per_node, master_port=opts.master_port)
    url = checkpoint_url(trainer_args, opts.checkpoints)
    resume = decide(url)
    folder = checkpoint_url([], opts.checkpoint_mount) if opts.checkpoint_mount else url
    args = rewrite_trainer_args(trainer_args, folder, resume.step)
    env = {
        ENV_CHECKPOINTS: url,
        ENV_LEDGER: ledger_url(url),
        ENV_RESUME_STEP: "none" if resume.step is None else str(resume.step),
    }
    if opts.commit_wait_s:
        env[ENV_COMMIT_WAIT_S] = f"{opts.commit_wait_s:g}"
    return Plan(topo, resume, torchrun_argv(topo, args, module=opts.trainer_module), env)


def exit_decision(outcome: dict | None, rc: int | None, notice: Notice | None, hang: str | None) -> tuple[int, str]:
    """(exit code, reason) from what the trainer said and how torchrun ended.

    A notice the trainer could not save for exits RETRYABLE, not PREEMPTED_SAVED:
    75 promises a committed checkpoint at the notice; both codes make the managed
    job recover, and the ledger keeps the difference.
    """
    kind = (outcome or {}).get("outcome")
    step = (outcome or {}).get("step")
    if kind == "finished":
        return ExitCode.FINISHED, f"training finished at step {step}"
    if kind == "preempted_saved":
        return ExitCode.PREEMPTED_SAVED, f"preempted; state saved and committed at step {step}"
    if hang:
        return ExitCode.RETRYABLE, hang
    if kind == "preempted_unsaved":
        why = (outcome or {}).get("reason") or "no time to save"
        return ExitCode.RETRYABLE, f"preempted without a save ({why}); the restart resumes from the last committed step"
    if notice is not None:
        return ExitCode.RETRYABLE, f"notice from {notice.source}, but the trainer did not report a save (torchrun exit {rc})"
    if rc == 0:
        return ExitCode.FINISHED, "torchrun exited 0"
    if rc is None:
        return ExitCode.RETRYABLE, "torchrun was killed by the wrapper"
    return ExitCode.RETRYABLE, f"torchrun failed (exit {rc}): worker crash, NCCL/gloo or store error"


def _incarnation(opts: NodeOptions) -> str:
    return opts.incarnation or os.environ.get(ENV_INCARNATION) or time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _fresh_run_dir(opts: NodeOptions, incarnation: str, node_rank: int) -> Path:
    given = opts.run_dir or os.environ.get(ENV_RUN_DIR)
    if given:
        run_dir = Path(given)
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (NOTICE_FILE, OUTCOME_FILE):
            (run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(run_dir / HEARTBEAT_DIR, ignore_errors=True)
        return run_dir
    return Path(tempfile.mkdtemp(prefix=f"supervise-{incarnation}-node{node_rank}-"))


class _Journal:
    """The ledger, or nothing when it cannot be opened (the run matters more)."""

    def __init__(self, url: str, writer: str, incarnation: str):
        try:
            from supervisor.ledger.journal import Journal

            self._j = Journal(url, writer=writer, incarnation=incarnation)
        except Exception as err:  # noqa: BLE001 - a ledger problem must not stop training
            log.warning("ledger %s unavailable: %s", url, err)
            self._j = None

    def emit(self, kind: str, **fields) -> None:
        if self._j is not None:
            self._j.emit(kind, **fields)


def _say(line: str) -> None:
    print(f"supervise node: {line}", flush=True)


def run(opts: NodeOptions, trainer_args: list[str]) -> int:
    """Plan, start torchrun, watch it; returns the exit code (supervisor.exitcodes)."""
    t0 = time.monotonic()
    plan = make_plan(opts, trainer_args)
    topo = plan.topology
    incarnation = _incarnation(opts)
    _say(plan.describe())
    run_dir = _fresh_run_dir(opts, incarnation, topo.node_rank)
    env = {**os.environ, **plan.env, ENV_RUN_DIR: str(run_dir), ENV_INCARNATION: incarnation}

    notices: list[Notice] = []
    lock = threading.Lock()
    kill_now = threading.Event()

    def on_notice(notice: Notice) -> None:
        with lock:
            if notices:
                return
            notices.append(notice)
        write_json_atomic(run_dir / NOTICE_FILE, notice.as_json())

    def on_signal(signum, _frame) -> None:
        if notices and signum == signal.SIGINT:
            kill_now.set()  # a second Ctrl-C: stop waiting for the save
        on_notice(Notice(signal.Signals(signum).name.lower(), time.time(), None))

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    process.become_subreaper()
    watcher = NoticeWatcher(
        on_notice,
        notice_file=Path(opts.notice_file) if opts.notice_file else None,
        cloud=opts.cloud,
        urls=cloud_urls(opts.metadata_urls),
        poll_s=opts.notice_poll_s,
    )
    rc: int | None = None
    hang: str | None = None
    try:
        proc = process.start(plan.command, env)
        overhead_s = round(time.monotonic() - t0, 3)
        # Ledger writes are store round trips: after torchrun is on its way, not before.
        journal = _Journal(plan.env[ENV_LEDGER], f"node{topo.node_rank}", incarnation)
        journal.emit("node_start", node_rank=topo.node_rank, num_nodes=topo.nnodes, nproc_per_node=topo.nproc_per_node,
                     host=socket.gethostname(), accelerator=topo.accelerator)  # fmt: skip
        journal.emit("resume", step=plan.resume.step, skipped=plan.resume.skipped, reason=plan.resume.reason)
        journal.emit("trainer_start", command=plan.command, pid=proc.pid, wrapper_overhead_s=overhead_s)
        watcher.start()
        dog = Watchdog(hang_timeout_s=opts.hang_timeout_s, startup_timeout_s=opts.startup_timeout_s, now=time.monotonic())
        give_up_at: float | None = None
        reported = False
        while rc is None:
            try:
                rc = proc.wait(TICK_S)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if notices and not reported:
                reported = True
                n = notices[0]
                budget = (n.deadline - time.time()) if n.deadline else opts.grace_s
                give_up_at = now + max(budget, 0.0)
                _say(f"preemption notice from {n.source}; asking the trainer to save (waiting up to {max(budget, 0):.0f} s)")
                journal.emit("notice", source=n.source, deadline=n.deadline, received_at=n.received_at)
            hang = dog.observe(heartbeat_steps(run_dir), now)
            if hang:
                _say(f"{hang}; killing the workers")
                break
            if kill_now.is_set() or (give_up_at is not None and now > give_up_at):
                _say("the trainer did not finish saving in time; killing the workers")
                break
    finally:
        watcher.stop()
        process.kill_all(grace_s=0 if hang else 5.0)
        for s, handler in old.items():
            signal.signal(s, handler)

    outcome = read_json(run_dir / OUTCOME_FILE)
    notice = notices[0] if notices else None
    code, reason = exit_decision(outcome, rc, notice, hang)
    if outcome and outcome.get("outcome", "").startswith("preempted"):
        saved = outcome.get("outcome") == "preempted_saved"
        journal.emit("preempted", with_notice=True, saved_step=outcome.get("step") if saved else None)
    journal.emit("exit", code=int(code), reason=reason)
    _say(f"exit {int(code)}: {reason}")
    if not (opts.run_dir or os.environ.get(ENV_RUN_DIR)):
        shutil.rmtree(run_dir, ignore_errors=True)
    return int(code)
