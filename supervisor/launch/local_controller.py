"""The detached process that runs one local job like a SkyPilot managed job.

`python -m supervisor.launch.local_controller JOB_DIR` (started by
LocalBackend.schedule). First the task's setup on every node directory, then
the loop: start all nodes on a fresh rendezvous port, watch them (exit codes,
heartbeats, stop requests, chaos), tear everything down, then finish, fail or
recover according to `local.decide` (SkyPilot's rule).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from supervisor.contract.node import NodeOptions
from supervisor.launch import chaos, procs
from supervisor.launch.base import CANCELLED, FAILED, FAILED_SETUP, RECOVERING, RUNNING, STARTING, SUCCEEDED
from supervisor.launch.local import (NOTICE_IN, LocalJob, RestartRule, decide, node_dir, node_env, node_options_for,
                                     skypilot_exit_codes)
from supervisor.node.notices import SaveWait
from supervisor.node.prctl import become_subreaper
from supervisor.contract.runtime import heartbeat_steps, read_json, write_json_atomic

POLL_S = 0.2
# while a save-triggered chaos event waits: a save's objects are in the bucket
# without their commit marker for well under a second at debug size
SAVE_WATCH_POLL_S = 0.02
HEARTBEAT_EVERY_S = 0.5
FAILURE_GRACE_S = 3.0  # after a node fails, time for its peers' own exits to be seen
SETUP_DONE = ".supervise-setup-done"  # in a node directory once its setup succeeded
LEDGER_POLL_S = 2.0  # stop: how often the run ledger is read for the nodes' save progress
NODE_EXIT_SLACK_S = 60.0  # stop: after a wrapper gives up on the save, time to kill its workers and exit
STATUS_CHECK_GAP_S = 15.0  # SkyPilot's JOB_STATUS_CHECK_GAP_SECONDS (sky/jobs/utils.py): how soon it sees an exit


def read_events(url: str):
    from supervisor.ledger.journal import read_events as read

    return read(url)


def stop_requested(checkpoints_url: str) -> bool:
    """`supervise stop`'s request is in the bucket (launch.skypilot.write_stop_request)."""
    from supervisor.contract.layout import STOP_REQUEST
    from supervisor.store.fs import Store

    try:
        Store(checkpoints_url).cat(*STOP_REQUEST)
    except Exception:  # noqa: BLE001 - absent, or an unreadable bucket: no stop known, the job's result stands
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_program(opts: NodeOptions) -> NodeOptions:
    """`supervise node` runs this installation's entry point even when its venv is not on PATH."""
    if opts.program == ("supervise",) and not shutil.which("supervise"):
        beside = Path(sys.executable).parent / "supervise"
        program = (str(beside),) if beside.exists() else (sys.executable, "-c", "from supervisor.entry import main; main()")
        return replace(opts, program=program)
    return opts


@dataclass
class Node:
    rank: int
    proc: subprocess.Popen
    run_dir: Path
    code: int | None = None
    exited_at: float | None = None


class Controller:
    def __init__(self, folder: Path):
        self.folder = folder
        self.job = LocalJob(**read_json(folder / "job.json"))
        self.state = read_json(folder / "state.json") or {}
        self.plan = [chaos.ChaosEvent(**e) for e in self.job.chaos]
        self.fired: set[int] = set()
        self.stop_requested: dict | None = None
        self.journal = None
        self._store = None  # the checkpoints' store, for save-triggered chaos (one client for every poll)
        self.log_file = open(folder / "job.log", "a", buffering=1)

    # ---- bookkeeping ----

    def log(self, msg: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.log_file.write(f"{stamp} {msg}\n")

    def save(self, **changes) -> None:
        self.state.update(changes, updated_at=time.time())
        write_json_atomic(self.folder / "state.json", self.state)

    def emit(self, kind: str, incarnation: int, **fields) -> None:
        """Record a ledger event as writer "controller" (one journal per incarnation)."""
        if not self.job.ledger_url:
            return
        from supervisor.ledger.journal import Journal

        if self.journal is None or self.journal.incarnation != str(incarnation):
            self.journal = Journal(self.job.ledger_url, writer="controller", incarnation=str(incarnation))
        self.journal.emit(kind, **fields)

    # ---- one incarnation ----

    def node_env(self, rank: int, inc: int, run_dir: Path) -> dict[str, str]:
        """This shell's environment (the node "image"), the task's envs, SkyPilot's names;
        this interpreter's bin first on PATH, as a node's venv would be."""
        task_id = f"sky-managed-{time.strftime('%Y-%m-%d-%H-%M-%S', time.gmtime(self.job.submitted_at))}_{self.job.name}_1"
        env = {**os.environ, **self.job.env}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(node_env(self.job, rank=rank, incarnation=inc, run_dir=run_dir, task_id=task_id))
        return env

    def popen(self, rank: int, argv: list[str], env: dict[str, str], banner: str) -> subprocess.Popen:
        cwd = node_dir(self.job.name, rank)
        cwd.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"node-{rank}.log", "ab") as out:
            out.write(f"=== {banner} ===\n".encode())
            out.flush()
            return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=cwd)

    def setup(self) -> list[int] | None:
        """Run the task's setup on every node directory that has not finished it, all
        at once, as SkyPilot's task codegen runs `setup` on every node before `run`
        (sky/backends/task_codegen.py, add_setup: one setup worker per node, then
        FAILED_SETUP with every node's return codes if any is non-zero).
        Returns those codes when setup failed, else None."""
        todo = [r for r in range(self.job.num_nodes) if not (node_dir(self.job.name, r) / SETUP_DONE).exists()]
        if not self.job.setup.strip() or not todo:
            return None
        self.log(f"setup on node(s) {todo}")
        procs_ = {}
        for rank in todo:
            run_dir = self.folder / "run" / "setup" / f"node-{rank}"
            run_dir.mkdir(parents=True, exist_ok=True)
            procs_[rank] = self.popen(rank, ["bash", "-c", self.job.setup], self.node_env(rank, 0, run_dir),
                                      f"setup, node {rank}/{self.job.num_nodes}")
        codes = {}
        while len(codes) < len(procs_):
            if read_json(self.folder / "cancel.json") is not None:
                for proc in procs_.values():
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
            for rank, proc in procs_.items():
                if rank not in codes and (code := proc.poll()) is not None:
                    codes[rank] = code
            time.sleep(POLL_S)
        for rank, code in codes.items():
            if code == 0:
                (node_dir(self.job.name, rank) / SETUP_DONE).touch()
        self.log(f"setup exit codes {dict(sorted(codes.items()))}")
        return None if all(c == 0 for c in codes.values()) else [codes[r] for r in sorted(codes)]

    def start_nodes(self, inc: int) -> list[Node]:
        port = free_port()
        nodes = []
        for rank in range(self.job.num_nodes):
            run_dir = self.folder / "run" / str(inc) / f"node-{rank}"
            run_dir.mkdir(parents=True, exist_ok=True)
            opts = node_options_for(self.job.node_argv, master_port=port, notice_file=run_dir / NOTICE_IN)
            argv = resolve_program(opts).to_argv()
            proc = self.popen(rank, argv, self.node_env(rank, inc, run_dir),
                              f"incarnation {inc}, node {rank}/{self.job.num_nodes}, master port {port}")
            nodes.append(Node(rank, proc, run_dir))
        self.log(f"incarnation {inc}: started {len(nodes)} node(s) (pids {[n.proc.pid for n in nodes]}), master port {port}")
        self.save(state=STARTING if inc == 0 else RECOVERING, incarnation=inc, master_port=port,
                  nodes=[{"rank": n.rank, "pid": n.proc.pid} for n in nodes])
        return nodes

    def step(self, nodes: list[Node]) -> int | None:
        """The highest training step any rank of this incarnation reported."""
        steps = [step for node in nodes for step in heartbeat_steps(node.run_dir).values()]
        return max(steps, default=None)

    def saving(self, step: int | None) -> set[int]:
        """Steps a during-save chaos event waits for whose save is in flight now."""
        if not self.job.checkpoints_url:
            return set()
        if self._store is None:
            from supervisor.store.fs import Store

            self._store = Store(self.job.checkpoints_url)
        return {s for s in chaos.watched_saves(self.plan, self.fired, step) if chaos.save_in_progress(self._store, s)}

    def fire(self, i: int, inc: int, nodes: list[Node], step: int | None) -> None:
        ev = self.plan[i]
        self.fired.add(i)
        t = time.time()
        try:
            detail = self.act(ev, inc, nodes)
        except Exception as err:  # a failed fault injection must not take the job down
            detail = f"failed: {err!r}"
        took = round(time.time() - t, 3)
        self.log(f"chaos: {ev.describe()} (observed step {step}): {detail}")
        self.emit("chaos", inc, action=ev.kind, node_rank=ev.node, planned_step=ev.at_step, step=step, detail=detail,
                  at=t, duration_s=took)
        fired = self.state.get("chaos_fired", [])
        fired.append({**ev.to_dict(), "index": i, "observed_step": step, "incarnation": inc, "time": t,
                      "duration_s": took, "detail": detail})
        self.save(chaos_fired=fired)

    def act(self, ev: chaos.ChaosEvent, inc: int, nodes: list[Node]) -> str:
        node_tag = procs.tag(self.job.name, inc, ev.node)
        if ev.kind == "notice":
            return chaos.preempt_with_notice(nodes[ev.node].proc.pid, nodes[ev.node].run_dir / NOTICE_IN, ev.deadline_s)
        if ev.kind == "kill":
            return f"SIGKILLed {chaos.preempt_without_notice(node_tag)} process(es)"
        if ev.kind == "stall":
            rank = chaos.stall_rank(node_tag)
            return f"SIGSTOPped rank {rank}" if rank is not None else "no worker to stall yet"
        if not self.job.checkpoints_url:
            return "no checkpoint URL to corrupt"
        return chaos.corrupt_newest(self.job.checkpoints_url)

    def watch(self, nodes: list[Node], inc: int) -> bool:
        """Until the incarnation is over; returns True when a stop was requested."""
        last_hb = 0.0
        first_exit = None
        step = None  # this incarnation's, from its heartbeats
        killed = False  # a chaos kill ended this incarnation: nothing more fires in it
        while True:
            procs.reap_orphans({n.proc.pid for n in nodes})
            for node in nodes:
                if node.code is None and (code := node.proc.poll()) is not None:
                    node.code, node.exited_at = code, time.time()
                    first_exit = first_exit or time.monotonic()
                    self.log(f"incarnation {inc}: node {node.rank} exited {code}")
                    if code < 0:
                        self.emit("preempted", inc, with_notice=False, saved_step=None, node_rank=node.rank)
            if all(n.code is not None for n in nodes):
                return False
            if first_exit is not None:
                codes = [n.code for n in nodes if n.code is not None]
                if any(c < 0 for c in codes):
                    return False  # a node is gone: its peers can only hang in collectives
                grace = self.job.peer_grace_s if all(c in (0, 75) for c in codes) else FAILURE_GRACE_S
                if time.monotonic() - first_exit > grace:
                    return False
            if self.stop_requested is None:
                req = read_json(self.folder / "cancel.json")
                if req is not None:
                    self.stop_requested = req
            if self.stop_requested is not None:
                self.stop(nodes, graceful=bool(self.stop_requested.get("graceful", True)))
                return True
            fresh = time.monotonic() - last_hb > HEARTBEAT_EVERY_S
            if fresh:
                last_hb = time.monotonic()
                step = self.step(nodes)
                if step is not None and step != self.state.get("step"):
                    if self.state.get("state") != RUNNING and inc > 0:
                        self.emit("recovery_finished", inc, step=step)
                    self.save(step=step, state=RUNNING)
            # Step-triggered chaos on each heartbeat read, save-triggered chaos on every poll;
            # none once a node is leaving (let the incarnation end as it is).
            watching = first_exit is None and not killed and chaos.watched_saves(self.plan, self.fired, step)
            if first_exit is None and not killed and (fresh or watching):
                for i in chaos.due(self.plan, self.fired, step, live=True, saving=self.saving(step)):
                    self.fire(i, inc, nodes, step)
                    if self.plan[i].kind == "kill":
                        killed = True
                        break
            time.sleep(SAVE_WATCH_POLL_S if watching else POLL_S)

    def stop(self, nodes: list[Node], *, graceful: bool) -> None:
        """SIGTERM the wrappers (they save and commit), wait, then kill whatever is left.
        The wait has no fixed budget: it is the wrappers' own (notices.SaveWait: this
        run's measured save + commit from the ledger, at least graceful_timeout_s,
        longer while saves and commits keep being reported) plus their exit."""
        if graceful:
            self.log("stop requested: SIGTERM to every node wrapper, waiting for them to save")
            for node in nodes:
                if node.proc.poll() is None:
                    try:
                        node.proc.send_signal(signal.SIGTERM)
                    except OSError:
                        pass
            wait = self.save_wait()
            next_read = time.monotonic() + LEDGER_POLL_S
            while any(n.proc.poll() is None for n in nodes):
                now = time.monotonic()
                if now >= next_read and self.job.ledger_url:
                    next_read = now + LEDGER_POLL_S
                    events, problems = read_events(self.job.ledger_url)
                    if events or not problems:
                        wait.observe(events, now)
                if now > wait.give_up_at + NODE_EXIT_SLACK_S:
                    self.log(f"stop: the nodes did not finish saving ({wait.describe()}); killing them")
                    break
                time.sleep(POLL_S)
        for node in nodes:
            node.code = node.proc.poll()
        self.log(f"stop: node exit codes {[n.code for n in nodes]}")

    def save_wait(self) -> SaveWait:
        """The node wrappers' wait for a save without deadline (their defaults), with
        this job's graceful_timeout_s as the floor."""
        wait = SaveWait(self.job.graceful_timeout_s, NodeOptions().hang_timeout_s, time.monotonic())
        if self.job.ledger_url:
            events, problems = read_events(self.job.ledger_url)
            if events or not problems:
                wait.observe(events, time.monotonic())
        self.log(f"stop: {wait.describe()}")
        return wait

    def teardown(self, inc: int, nodes: list[Node]) -> None:
        n = procs.kill_tagged(procs.tag(self.job.name, inc, 0).rsplit("/", 1)[0] + "/")
        for node in nodes:
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        procs.reap_orphans(set())
        if n:
            self.log(f"incarnation {inc}: killed {n} leftover process(es)")

    # ---- the managed job ----

    def run(self) -> int:
        become_subreaper()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.save(controller_pid=os.getpid(), state=STARTING, recoveries=0, errors=0, reason=None, chaos_fired=[])
        self.log(f"controller {os.getpid()} for job {self.job.name!r}: {self.job.num_nodes} node(s), command {self.job.node_argv}")
        for ev in self.plan:
            self.log(f"chaos plan: {ev.describe()}")
        # One rule object for the whole job, like SkyPilot's StrategyExecutor.
        rule = RestartRule(self.job.max_restarts_on_errors, self.job.recover_on_exit_codes)
        inc, recoveries = 0, 0
        while True:
            failed_setup = self.setup()
            if read_json(self.folder / "cancel.json") is not None:
                return self.finish(inc, CANCELLED, "stopped by the user")
            if failed_setup is not None:
                # SkyPilot sends setup's return codes through the same rule (FAILED_SETUP).
                if not rule.should_restart_on_failure(failed_setup):
                    tail = self.last_line(failed_setup)
                    return self.finish(inc, FAILED_SETUP, f"setup exited {failed_setup}" + (f"; {tail}" if tail else "")
                                       + f" (see `supervise logs {self.job.name}`)")
                recoveries += 1
                self.save(state=RECOVERING, recoveries=recoveries, errors=rule.restart_cnt_on_failure)
                continue
            nodes = self.start_nodes(inc)
            stopped = self.watch(nodes, inc)
            codes = {n.rank: n.code for n in nodes}
            self.teardown(inc, nodes)
            if stopped:
                return self.finish(inc, CANCELLED, "stopped by the user")
            d = decide(codes, num_nodes=self.job.num_nodes, rule=rule)
            self.log(f"incarnation {inc}: exit codes {codes} -> {d.action}: {d.reason}")
            if d.action == "finish":
                return self.finish(inc, CANCELLED if self.cancelled_after_stop() else SUCCEEDED,
                                   "stopped by the user" if self.stop_requested else None)
            if d.action == "fail":
                tail = self.last_line(skypilot_exit_codes(codes, self.job.num_nodes))
                return self.finish(inc, FAILED, d.reason + (f"; {tail}" if tail else ""))
            recoveries += 1
            self.save(state=RECOVERING, recoveries=recoveries, errors=rule.restart_cnt_on_failure,
                      last_recovery_reason=d.reason)
            self.emit("recovery_started", inc, reason=d.reason)
            for i in chaos.due(self.plan, self.fired, self.state.get("step"), live=False):
                self.fire(i, inc, nodes, self.state.get("step"))
            inc += 1

    def cancelled_after_stop(self) -> bool:
        """Nodes that all exited 0 on `supervise stop`'s request in the bucket: the cancel
        that follows lands before SkyPilot's controller looks again (its monitor loop
        checks the job every JOB_STATUS_CHECK_GAP_SECONDS, sky/jobs/utils.py), so the job
        ends CANCELLED, not SUCCEEDED. Waits that long for the cancel; without a stop
        request, or with no cancel by then, the job succeeded."""
        if not self.job.checkpoints_url or not stop_requested(self.job.checkpoints_url):
            return False
        deadline = time.monotonic() + STATUS_CHECK_GAP_S
        while time.monotonic() < deadline:
            if read_json(self.folder / "cancel.json") is not None:
                self.stop_requested = read_json(self.folder / "cancel.json")
                return True
            time.sleep(POLL_S)
        return False

    def last_line(self, codes: list[int]) -> str:
        """The last line the first failing node printed (the wrapper's one-line reason)."""
        rank = next((r for r, c in enumerate(codes) if c not in (0, None)), 0)
        try:
            with open(self.folder / f"node-{rank}.log", "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 4096))
                lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return f"node {rank} said: {lines[-1][:300]}" if lines else ""

    def finish(self, inc: int, state: str, reason: str | None) -> int:
        self.save(state=state, reason=reason, nodes=[], finished_at=time.time())
        self.emit("job_finished", inc, state=state, **({"reason": reason} if reason else {}))
        self.log(f"job {state}" + (f": {reason}" if reason else ""))
        return 0

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = {"graceful": True, "signal": signum}


def main() -> int:
    ctl = Controller(Path(sys.argv[1]))
    try:
        return ctl.run()
    except BaseException as err:  # never leave nodes running behind a dead controller
        import traceback

        traceback.print_exc()
        procs.kill_tagged(f"{ctl.job.name}/")
        ctl.finish(int(ctl.state.get("incarnation") or 0), FAILED, f"local controller error: {err!r}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
