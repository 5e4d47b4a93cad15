"""`supervise node`: turn SkyPilot's bare restart of `run` into a correct resume.

On every start: validate the trainer args, read the topology from SKYPILOT_*,
ask the catalog for the newest verified step, check that a job asking for GPUs
has CUDA (gpu.py), consult the restart record (give up after K failures
without progress, see budget.py), start torchrun (own
session) with the checkpoint flags rewritten and, beside it, TorchTitan's own
parser on the args; then watch four things until torchrun exits: that parser's
verdict, preemption notices (signals, file, cloud metadata), the ranks'
heartbeats, and torchrun itself. Whatever happens, no process it started
survives it, and the exit code says what the managed job should do next
(supervisor.contract.exitcodes).
"""

from __future__ import annotations

import json
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
from typing import TYPE_CHECKING

from supervisor.contract.layout import ledger_url, stop_request_url
from supervisor.contract.node import Mount, NodeOptions
from supervisor.errors import SuperviseError
from supervisor.contract.exitcodes import RECOVER_ON, ExitCode, process_exit
from supervisor.node import budget, process
from supervisor.node.early import take as take_prestarted
from supervisor.node.gpu import CudaProbe, driver_version, gpus_requested, unusable
from supervisor.node.notices import STOP, Notice, NoticeWatcher, SaveWait, cloud_urls, done_marker
from supervisor.node.prctl import die_with_parent
from supervisor.node.resume import (
    ResumePlan,
    checkpoint_url,
    decide,
    rewrite_trainer_args,
    store_errors,
    validate_trainer_args,
)
from supervisor.node.torchrun import (
    LOG_DIR_ENV,
    Topology,
    trainer_error,
    topology_from_env,
    torchrun_argv,
    torchrun_executable,
)
from supervisor.node.watchdog import Watchdog
from supervisor.ledger.skypilot import placement
from supervisor.titan_config import CheckUnavailable, TitanArgsCheck, arg_value, strip_node_owned
from supervisor.contract.runtime import (
    ENV_CHECKPOINT_KEEP,
    ENV_CHECKPOINTS,
    ENV_COMMIT_WAIT_S,
    ENV_INCARNATION,
    ENV_LEDGER,
    ENV_RESUME_STEP,
    ENV_RUN_DIR,
    ENV_WRITE_MODE,
    HEARTBEAT_DIR,
    NOTICE_FILE,
    OUTCOME_FILE,
    SAVE_NOW_FILE,
    WRITE_DIRECT,
    WRITE_MOUNT,
    heartbeat_steps,
    read_json,
    write_json_atomic,
)

if TYPE_CHECKING:
    from supervisor.ledger.interval import IntervalChoice
    from supervisor.store.catalog import Catalog

log = logging.getLogger(__name__)

TICK_S = 0.25
ARGS_VERDICT_WAIT_S = 300.0  # after torchrun exited non-zero: how long to wait for TorchTitan's parser
MARK_WAIT_S = 10.0  # at exit: how long a node > 0 waits for its mark (budget.PeerMarks) to be written
LEDGER_POLL_S = 2.0  # while a save without deadline is awaited: how often the run ledger is re-read
PEER_EXIT_WAIT_S = 30.0  # a multi-node head's recoverable exit: how long it waits for the others' exits
PEER_EXIT_MARGIN_S = 3.0  # after their exit events: until their processes (and srun's tasks) are gone


@dataclass
class Plan:
    topology: Topology
    resume: ResumePlan
    command: list[str]
    env: dict[str, str]  # the SUPERVISE_* names added to the trainer's environment
    interval: IntervalChoice | None = None  # checkpoint.interval auto: what was chosen and why
    catalog: Catalog | None = field(default=None, repr=False)  # the one store client of this start

    def describe(self) -> str:
        if self.resume.step is None:
            line = f"fresh start: {self.resume.reason} under {self.resume.checkpoints}"
        else:
            line = f"{self.resume.reason} (under {self.resume.checkpoints})"
        return line if self.interval is None else f"{line}; checkpoint.interval {self.interval.reason}"

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
    from supervisor.store.catalog import Catalog

    url = checkpoint_url(trainer_args, opts.checkpoints)
    catalog = Catalog(url)
    resume = decide(catalog)
    choice = None
    if opts.interval:  # auto: Young/Daly from the run's ledger (supervisor.ledger.interval)
        from supervisor.ledger.interval import for_run

        choice = for_run(ledger_url(url), opts.interval.low, opts.interval.high)
        trainer_args = [*trainer_args, "--checkpoint.interval", str(choice.steps)]
    mount = opts.write if isinstance(opts.write, Mount) else None
    args = rewrite_trainer_args(trainer_args, checkpoint_url([], mount.path) if mount else url, resume.step)
    env = {
        ENV_CHECKPOINTS: url,
        ENV_LEDGER: ledger_url(url),
        ENV_RESUME_STEP: "none" if resume.step is None else str(resume.step),
        ENV_WRITE_MODE: WRITE_MOUNT if mount else WRITE_DIRECT,
    }
    if mount and mount.commit_wait_s is not None:  # 0 is a choice (no wait), not "unset"
        env[ENV_COMMIT_WAIT_S] = f"{mount.commit_wait_s:g}"
    if opts.keep:
        env[ENV_CHECKPOINT_KEEP] = str(opts.keep)
    return Plan(topo, resume, torchrun_argv(topo, args, module=opts.trainer_module), env, interval=choice, catalog=catalog)


def exit_decision(outcome: dict | None, rc: int | None, notice: Notice | None, hang: str | None,
                  error: str | None = None) -> tuple[int, str]:
    """(exit code, reason) from what the trainer said and how torchrun ended;
    `error`: the first rank's own error line (torchrun.trainer_error), named when torchrun failed.

    A notice the trainer could not save for exits RETRYABLE, not PREEMPTED_SAVED:
    75 promises a committed checkpoint at the notice; both codes make the managed
    job recover, and the ledger keeps the difference.
    """
    kind = (outcome or {}).get("outcome")
    step = (outcome or {}).get("step")
    if kind == "finished":
        return ExitCode.FINISHED, f"training finished at step {step}"
    if notice is not None and notice.source == STOP:  # `supervise stop`: done, not a preemption to recover
        if kind == "preempted_saved":
            return ExitCode.FINISHED, f"stopped on request; state saved and committed at step {step}"
        why = (outcome or {}).get("reason") if kind in ("preempted_unsaved", "commit_failed") else hang
        return ExitCode.FINISHED, f"stopped on request; not saved: {why}" if why else "stopped on request; no save reported"
    if kind == "preempted_saved":
        return ExitCode.PREEMPTED_SAVED, f"preempted; state saved and committed at step {step}"
    if kind == "commit_failed":  # the trainer stopped: training on unsaved helps nobody
        return ExitCode.RETRYABLE, (outcome or {}).get("reason") or "checkpoint commits failed"
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
    if error:
        return ExitCode.RETRYABLE, f"torchrun failed (exit {rc}): {error}"
    return ExitCode.RETRYABLE, f"torchrun failed (exit {rc}): worker crash, NCCL/gloo or store error"


def saved_step(outcome: dict | None) -> int | None:
    """The step the trainer saved and committed at a notice or stop, for the exit event."""
    if (outcome or {}).get("outcome") == "preempted_saved" and isinstance(outcome.get("step"), int):
        return outcome["step"]
    return None


class _LedgerWatch:
    """The run ledger's events, re-read in a thread every `every_s` while a save
    without deadline is awaited: a slow store must not stall the wrapper's loop."""

    def __init__(self, url: str, every_s: float):
        self.url, self.every_s = url, every_s
        self._events: list | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="supervise-ledger-watch", daemon=True).start()

    def _run(self) -> None:
        from supervisor.ledger.journal import read_events

        while not self._stop.is_set():
            try:
                events, problems = read_events(self.url)
            except Exception as err:  # noqa: BLE001 - the wait goes on with what it knew
                events, problems = [], [str(err)]
            if events or not problems:  # an unreadable ledger is no news (a missing one is)
                with self._lock:
                    self._events = events
            self._stop.wait(self.every_s)

    def take(self) -> list | None:
        """The events of the newest read not taken yet, else None."""
        with self._lock:
            events, self._events = self._events, None
        return events

    def close(self) -> None:
        self._stop.set()


def _incarnation() -> str:
    return os.environ.get(ENV_INCARNATION) or time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _fresh_run_dir(opts: NodeOptions, incarnation: str, node_rank: int) -> Path:
    given = opts.run_dir or os.environ.get(ENV_RUN_DIR)
    if given:
        run_dir = Path(given)
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (NOTICE_FILE, SAVE_NOW_FILE, OUTCOME_FILE):
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


def _prove_commit_support(catalog: Catalog) -> None:
    """The store canary (owner: store): a store that cannot refuse a second create
    cannot keep two writers from both committing a step -- a config error (78)."""
    from supervisor.store.catalog import StoreInputError, StoreUnreachable

    try:
        catalog.prove_conditional_create()
    except StoreUnreachable as err:
        raise SuperviseError(str(err), ExitCode.RETRYABLE) from err
    except StoreInputError as err:
        raise SuperviseError(str(err), ExitCode.USER_ERROR) from err


class _Record:
    """This start's view of the restart record; node rank 0 alone writes it."""

    def __init__(self, catalog: Catalog, trainer_args: list[str], step: int | None, incarnation: str, writer: bool):
        self.io = budget.RestartRecord(catalog.store)
        with store_errors(catalog.url):
            stored = self.io.load()
        self.data = budget.close_open(budget.for_config(stored, budget.config_hash(trainer_args)), step)
        self.incarnation, self.step, self.writer = incarnation, step, writer
        incs = self.data["incarnations"]
        if incs and incs[-1].get("code") == ExitCode.RETRYABLE:  # what did the peers see first?
            budget.first_cause(self.data, _peer_marks(catalog))

    def save(self) -> None:
        if not self.writer:
            return
        try:
            self.io.save(self.data)
        except SuperviseError as err:  # the run matters more; the next start sees this one as lost
            log.warning("restart record %s not written: %s", self.io.url, err)


def _peer_marks(catalog: Catalog) -> list[dict]:
    """What the peers saw first (budget.PeerMarks); nothing when it cannot be read."""
    try:
        return budget.PeerMarks(catalog.store).read()
    except (SuperviseError, OSError) as err:
        log.warning("peer marks unknown: %s", err)
        return []


def _mark(catalog: Catalog, node_rank: int, kind: str, what: str, at: float, since: float) -> threading.Thread:
    """A node > 0 tells node 0's next start what went wrong here first and when
    (budget.first_cause): in a thread, so that a slow store never delays the save
    a notice asks for."""

    def write() -> None:
        try:
            budget.PeerMarks(catalog.store).write(node_rank, kind, what, at, since)
        except (SuperviseError, OSError) as err:
            log.warning("peer mark not written: %s", err)

    thread = threading.Thread(target=write, name="supervise-peer-mark", daemon=True)
    thread.start()
    return thread


def _titan_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("torchtitan")
    except metadata.PackageNotFoundError:
        return "?"


def _newest_step(catalog: Catalog) -> int | None:
    """The newest committed step now (the record's end of an incarnation); None if unknown."""
    try:
        return catalog.latest().step
    except (SuperviseError, OSError, ValueError) as err:
        log.warning("newest checkpoint at exit unknown: %s", err)
        return None


def run(opts: NodeOptions, trainer_args: list[str]) -> int:
    """One start in its phases: plan (make_plan) and budget (_give_up_if_recorded)
    before torchrun gets its command, then _Start's prestart, watch and finish;
    returns the exit code (supervisor.contract.exitcodes)."""
    t0, started_at = time.monotonic(), time.time()
    # torchrun imports torch (seconds) while the catalog decides; it waits for its
    # command on stdin (supervisor.node.prestarted). `supervise` started it first thing.
    early = take_prestarted()
    probe = CudaProbe(die_with_parent) if gpus_requested(os.environ) else None  # torch's answer, while the catalog decides
    try:
        plan = make_plan(opts, trainer_args)
        if probe is not None:
            _require_cuda(probe, gpus_requested(os.environ))
        incarnation = _incarnation()
        record = _Record(plan.catalog, trainer_args, plan.resume.step, incarnation, writer=plan.topology.node_rank == 0)
        _give_up_if_recorded(record, plan.resume.step, incarnation, opts.max_restarts_without_progress)
    except BaseException:
        process.kill_all(grace_s=0)
        raise
    _say(plan.describe())
    start = _Start(opts, trainer_args, plan, record, incarnation, started_at)
    try:
        start.watch(start.prestart(early, t0))
    finally:
        start.stop_everything()
    return start.finish()


def notice_wait(notice: Notice, now: float, grace_s: float, unmeasured_s: float,
                wall: float) -> tuple[float, SaveWait | None, str]:
    """(give up at, the measured wait or None, what to say) for a notice: until its
    deadline, or without one as long as this run's measured saves need."""
    what = "stop request (`supervise stop`)" if notice.source == STOP else f"preemption notice from {notice.source}"
    if notice.deadline:
        budget_s = max(notice.deadline - wall, 0.0)
        return now + budget_s, None, f"{what}; asking the trainer to save (waiting up to {budget_s:.0f} s)"
    wait = SaveWait(grace_s, unmeasured_s, now)  # nothing reclaims the machine at a known time
    return wait.give_up_at, wait, (f"{what}, no deadline; asking the trainer to save (waiting as long as this "
                                   "run's measured saves need)")


def gave_up_reason(kill_now: bool, save_wait: SaveWait | None) -> str:
    """Why the wrapper stopped waiting for a save it asked for."""
    if kill_now:
        return "a second Ctrl-C: the save was abandoned"
    if save_wait is not None:
        return f"the trainer did not finish saving in time ({save_wait.describe()})"
    return "the trainer did not finish saving before the notice's deadline"


def start_events(plan: Plan, trainer_args: list[str], pid: int, overhead_s: float, host: str) -> list[tuple[str, dict]]:
    """The ledger's node_start, resume and trainer_start of this start."""
    topo = plan.topology
    return [
        ("node_start", {"node_rank": topo.node_rank, "num_nodes": topo.nnodes, "nproc_per_node": topo.nproc_per_node,
                        "host": host, "accelerator": topo.accelerator, **placement(os.environ)}),
        ("resume", {"step": plan.resume.step, "skipped": plan.resume.skipped, "reason": plan.resume.reason,
                    **(plan.interval.fields() if plan.interval else _fixed_interval(trainer_args))}),
        ("trainer_start", {"command": plan.command, "pid": pid, "world_size": topo.nnodes * topo.nproc_per_node,
                           "wrapper_overhead_s": overhead_s}),
    ]


def exit_events(outcome: dict | None, code: int, reason: str, notice: Notice | None) -> list[tuple[str, dict]]:
    """The ledger's preempted (a notice, not a stop, the trainer reported on) and exit events."""
    events = []
    if outcome and outcome.get("outcome", "").startswith("preempted") and (notice is None or notice.source != STOP):
        saved = outcome.get("outcome") == "preempted_saved"
        events.append(("preempted", {"with_notice": True, "saved_step": outcome.get("step") if saved else None}))
    events.append(("exit", {"code": int(code), "reason": reason, "notice": notice.source if notice else None,
                            "saved_step": saved_step(outcome)}))  # also for a save at another node's notice
    return events


class _Start:
    """One start's state across its phases; the I/O of each phase at its edge."""

    def __init__(self, opts: NodeOptions, trainer_args: list[str], plan: Plan, record: _Record, incarnation: str,
                 started_at: float):
        self.opts, self.trainer_args, self.plan, self.record = opts, trainer_args, plan, record
        self.incarnation, self.started_at, self.node_rank = incarnation, started_at, plan.topology.node_rank
        self.run_dir = _fresh_run_dir(opts, incarnation, self.node_rank)
        self.logs = os.environ.get(LOG_DIR_ENV) or str(self.run_dir / "torchrun")  # where the ranks' error files go
        self.env = {**os.environ, **plan.env, ENV_RUN_DIR: str(self.run_dir), ENV_INCARNATION: incarnation,
                    LOG_DIR_ENV: self.logs}
        self.notices: list[Notice] = []
        self.early_notices: list[Notice] = []  # an early notice (AWS rebalance): the trainer saves and trains on
        self._lock = threading.Lock()
        self.kill_now = threading.Event()
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.watcher = NoticeWatcher(
            self._on_notice, notice_file=Path(opts.notice_file) if opts.notice_file else None, cloud=opts.cloud,
            urls=cloud_urls(opts.metadata_urls), poll_s=opts.notice_poll_s,
            stop_url=stop_request_url(plan.env[ENV_CHECKPOINTS]), on_early=self._on_early)
        # TorchTitan's own parser, beside torchrun rather than before it: it costs what
        # the trainer's own start costs (torch + model code), so it must not delay a good start.
        self.titan_version = _titan_version()
        checked = record.data.get("args_ok") == self.titan_version
        self.checker = None if checked else TitanArgsCheck(process.background_child)
        self.rc: int | None = None
        self.hang: str | None = None
        self.gave_up: str | None = None  # why the wrapper stopped waiting for a save it asked for
        self.stop: tuple[int, str] | None = None  # (code, reason) that ends this start before torchrun does
        self.ledger_watch: _LedgerWatch | None = None
        self.marking: threading.Thread | None = None  # this node's trouble, on its way to node 0's next start
        self.give_up_at: float | None = None
        self.save_wait: SaveWait | None = None  # a notice without deadline: the wait follows the measured saves

    def _on_notice(self, notice: Notice) -> None:
        with self._lock:
            if self.notices:
                return
            self.notices.append(notice)
        write_json_atomic(self.run_dir / NOTICE_FILE, notice.as_json())

    def _on_early(self, notice: Notice) -> None:
        self.early_notices.append(notice)
        write_json_atomic(self.run_dir / SAVE_NOW_FILE, notice.as_json())

    def _on_signal(self, signum, _frame) -> None:
        if self.notices and signum == signal.SIGINT:
            self.kill_now.set()  # a second Ctrl-C: stop waiting for the save
        self._on_notice(Notice(signal.Signals(signum).name.lower(), time.time(), None))

    def prestart(self, early: subprocess.Popen, t0: float) -> subprocess.Popen:
        """Release torchrun, then the store round trips (canary, record, ledger): the
        ranks take seconds to import torch, longer than any of these."""
        if self.checker is not None:
            self.checker.submit(strip_node_owned(self.trainer_args))
        proc = _release(early, self.plan.command, {k: v for k, v in self.env.items() if os.environ.get(k) != v})
        overhead_s = round(time.monotonic() - t0, 3)
        process.yield_cpu()
        try:
            _prove_commit_support(self.plan.catalog)
        except SuperviseError as err:
            self.stop = (err.exit_code, str(err))
            _say(f"{err}; stopping the workers")
        budget.begin(self.record.data, self.incarnation, self.plan.resume.step, self.started_at)
        self.record.save()
        self.journal = _Journal(self.plan.env[ENV_LEDGER], f"node{self.node_rank}", self.incarnation)
        for kind, fields in start_events(self.plan, self.trainer_args, proc.pid, overhead_s, socket.gethostname()):
            self.journal.emit(kind, **fields)
        self.watcher.start()
        return proc

    def watch(self, proc: subprocess.Popen) -> None:
        """Until torchrun exits, a hang, a stop, or a save waited for too long."""
        dog = Watchdog(hang_timeout_s=self.opts.hang_timeout_s, startup_timeout_s=self.opts.startup_timeout_s,
                       now=time.monotonic())
        reported, early_reported = False, 0
        while self.rc is None and self.stop is None:
            try:
                self.rc = proc.wait(TICK_S)
            except subprocess.TimeoutExpired:
                pass
            if self.checker is not None and self._args_rejected():
                break
            if self.rc is not None:
                break
            now = time.monotonic()
            if len(self.early_notices) > early_reported and not self.notices:
                e = self.early_notices[early_reported]
                early_reported += 1
                _say(f"early notice from {e.source}; asking the trainer to save at the next step and train on")
                self.journal.emit("early_notice", source=e.source, received_at=e.received_at)
            if self.notices and not reported:
                reported = True
                self._ask_for_save(self.notices[0], now)
            self._follow_save(now)
            self.hang = dog.observe(heartbeat_steps(self.run_dir), now)
            if self.hang:
                _say(f"{self.hang}; killing the workers")
                break
            if self.kill_now.is_set() or (self.give_up_at is not None and now > self.give_up_at):
                self.gave_up = gave_up_reason(self.kill_now.is_set(), self.save_wait)
                _say(f"{self.gave_up}; killing the workers")
                break

    def _args_rejected(self) -> bool:
        # torchrun exited 1: maybe TorchTitan's parse in the ranks; a signal is not an argument error
        state, bad_args = _verdict(self.checker, ARGS_VERDICT_WAIT_S if self.rc is not None and self.rc > 0 else 0.0)
        if state != "pending":
            self.checker.close()
            self.checker = None
        if state == "rejected":
            self.stop = (ExitCode.USER_ERROR, f"TorchTitan rejects the trainer arguments: {bad_args}")
            _say(f"{self.stop[1]}; stopping the workers")
        elif state == "accepted":
            self.record.data["args_ok"] = self.titan_version
            self.record.save()
        return state == "rejected"

    def _ask_for_save(self, n: Notice, now: float) -> None:
        self.give_up_at, self.save_wait, line = notice_wait(n, now, self.opts.grace_s, self.opts.hang_timeout_s,
                                                            time.time())
        if self.save_wait is not None:
            self.ledger_watch = _LedgerWatch(self.plan.env[ENV_LEDGER], LEDGER_POLL_S)
        _say(line)
        self.journal.emit("notice", source=n.source, deadline=n.deadline, received_at=n.received_at)
        if self.node_rank > 0 and n.source != STOP:
            self.marking = _mark(self.plan.catalog, self.node_rank, budget.NOTICE, n.source, n.received_at,
                                 self.started_at)

    def _follow_save(self, now: float) -> None:
        wait = self.save_wait
        if self.ledger_watch is None or wait is None or (events := self.ledger_watch.take()) is None:
            return
        first = wait.measured_s is None
        if wait.observe(events, now):
            _say(f"the trainer reports save progress; {wait.describe()} from now")
        elif first and wait.measured_s is not None:
            _say(wait.describe())
        self.give_up_at = wait.give_up_at

    def stop_everything(self) -> None:
        """No process this start began survives it; the signals are the caller's again."""
        self.trouble_at = time.time()  # the loop ended: torchrun exited, a hang, a stop (a notice's own time wins)
        if self.checker is not None:
            self.checker.close()
        if self.ledger_watch is not None:
            self.ledger_watch.close()
        self.watcher.stop()
        process.kill_all(grace_s=0 if (self.hang or self.stop) else 5.0)
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def finish(self) -> int:
        """The exit code and reason, in the ledger, the peers' marks and the restart record."""
        opts, plan, record = self.opts, self.plan, self.record
        outcome = read_json(self.run_dir / OUTCOME_FILE)
        notice = self.notices[0] if self.notices else None
        if self.stop:
            code, reason = self.stop
        else:
            code, reason = exit_decision(outcome, self.rc, notice, self.hang or self.gave_up,
                                         trainer_error(self.logs, self.started_at))
        for kind, fields in exit_events(outcome, code, reason, notice):
            self.journal.emit(kind, **fields)
        source = notice.source if notice else None
        preempted, cause = budget.cause_of(int(code), source)
        trouble_at = notice.received_at if notice is not None else self.trouble_at
        if self.node_rank > 0 and code == ExitCode.RETRYABLE and not preempted:
            self.marking = _mark(plan.catalog, self.node_rank, budget.FAILURE, reason, trouble_at, self.started_at)
        if self.marking is not None:
            self.marking.join(MARK_WAIT_S)
        if record.writer:
            end_step = plan.resume.step if self.stop else _newest_step(plan.catalog)
            budget.end(record.data, self.incarnation, code, reason, end_step, source, trouble_at)
            record.save()
        _say(f"exit {int(code)}: {reason}")
        status = process_exit(code, self.node_rank, plan.topology.nnodes)
        if status != code:
            _say(f"this node exits {int(status)}: node 0 exits {int(code)} for the job, after the other nodes")
        elif code in RECOVER_ON and self.node_rank == 0 and plan.topology.nnodes > 1:
            self._await_peer_exits()
        if preempted and code == ExitCode.RETRYABLE:
            _say(f"not counted as a restart without progress: {cause}")
        if not (opts.run_dir or os.environ.get(ENV_RUN_DIR)):
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if opts.notice_file and Path(opts.notice_file).parent.is_dir():  # a preStop hook may be waiting for this
            try:
                write_json_atomic(done_marker(Path(opts.notice_file)), {"code": int(code), "reason": reason})
            except OSError as err:
                log.warning("exit not marked beside the notice file: %s", err)
        return int(status)

    def _await_peer_exits(self) -> None:
        """The head exits last (exitcodes.process_exit): until every other node's exit
        event of this start is in the ledger, at most PEER_EXIT_WAIT_S."""
        from supervisor.ledger.journal import read_events
        from supervisor.store.retry import BRIEF

        waiting = {f"node{r}" for r in range(1, self.plan.topology.nnodes)}
        deadline = time.monotonic() + PEER_EXIT_WAIT_S
        while waiting and time.monotonic() < deadline:
            events, _ = read_events(self.plan.env[ENV_LEDGER], policy=BRIEF)
            waiting -= {e.writer for e in events if e.kind == "exit" and e.t >= self.started_at}
            time.sleep(LEDGER_POLL_S if waiting else PEER_EXIT_MARGIN_S)
        if waiting:
            _say(f"no exit from {', '.join(sorted(waiting))} in {PEER_EXIT_WAIT_S:g} s; exiting anyway")


def _fixed_interval(trainer_args: list[str]) -> dict:
    """The `resume` event's interval when the trainer args set it (the report reads it there)."""
    steps = arg_value(trainer_args, "--checkpoint.interval")
    return {"checkpoint_interval": int(steps), "interval_source": "args"} if steps and steps.isdigit() else {}


def _require_cuda(probe: CudaProbe, wanted: int) -> None:
    """GPU or nothing (supervisor.node.gpu): 78 before torchrun when torch cannot use CUDA."""
    found = probe.result()
    line = unusable(wanted, found, None if found.get("available") else driver_version())
    if line:
        raise SuperviseError(line, ExitCode.USER_ERROR)


def _give_up_if_recorded(record: _Record, step: int | None, incarnation: str, limit: int) -> None:
    """78 before anything trains: a recorded 78 for this config, or K restarts without progress."""
    verdict = budget.decide_start(record.data, step, limit)
    if not verdict.give_up:
        return
    if verdict.earlier:
        raise SuperviseError(
            f"{verdict.reason} (recorded by an earlier start of this config; change the config, "
            f"or delete {record.io.url} to try it again)", ExitCode.USER_ERROR,
        )  # fmt: skip
    budget.end(budget.begin(record.data, incarnation, step), incarnation, ExitCode.USER_ERROR, verdict.reason, step)
    record.save()
    raise SuperviseError(verdict.reason, ExitCode.USER_ERROR)


def _release(early: subprocess.Popen, command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Hand the prestarted torchrun its command (the args after the torchrun executable)."""
    prefix = torchrun_executable()
    assert command[: len(prefix)] == prefix, command
    try:
        early.stdin.write((json.dumps({"argv": command[len(prefix) :], "env": env}) + "\n").encode())
        early.stdin.close()
    except BrokenPipeError:
        pass  # it died importing torch: its exit code says so, as torchrun's would
    return early


def _verdict(checker: TitanArgsCheck, wait_s: float) -> tuple[str, str | None]:
    """("accepted" | "rejected" | "pending" | "unknown", reason) from TorchTitan's
    parser. A parser that cannot run, or is too slow once torchrun has failed,
    gives no verdict: the trainer's own exit then decides, as without the check."""
    try:
        reason = checker.result(wait_s)
    except TimeoutError:
        return ("unknown" if wait_s > 0 else "pending"), None
    except CheckUnavailable as err:
        log.warning("trainer args not checked: %s", err)
        return "unknown", None
    return ("rejected" if reason else "accepted"), reason
