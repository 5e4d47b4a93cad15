"""`supervise drill`: proof, before paying, that a recipe survives what spot does.

The recipe runs once uninterrupted as the reference, then once per drill (or
once with every drill combined, `--combined`) on the local backend, through
the same path as `supervise start --backend local` (recipe -> JobSpec ->
submit) with a chaos plan (launch/chaos.py). A drill PASSes only when the job
SUCCEEDED, its final weights and optimizer state are bit-identical to the
reference's (titan/results.py), and nothing committed was lost: every restart
resumed from the newest step committed before it, or from the one before when
the drill itself corrupted that one. Exit 1 on any FAIL.

Drills that hit a save fire once its objects are in the bucket and its commit
marker is not, not at a guessed time (chaos.save_in_progress). `store-outage`
freezes (SIGSTOP) the drill's own embedded store: it needs that store.

`supervise demo` is one drill set (`--drills demo`: chaos.demo_plan, a notice,
then a kill whose restart finds the newest checkpoint corrupt) run through
this same session: the same store, job, injection records and verdict.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from supervisor.contract.node import NodeOptions
from supervisor.errors import SuperviseError
from supervisor.launch.base import SUCCEEDED
from supervisor.launch.chaos import STORE_KINDS, ChaosEvent, demo_plan, freeze_store, save_in_progress
from supervisor.contract.layout import ledger_url

DRILLS = ("notice", "kill", "kill-during-save", "notice-during-save", "corrupt-newest", "stall-rank", "store-outage")
DRILL_SETS = ("demo",)  # named plans of several events, run only when asked for
STALL_HANG_S = 30  # the wrapper's --hang-timeout in a stall drill: the hang is noticed within the drill
STORE_OUTAGE_S = 30.0  # longer than a debug save, shorter than one call's retry window (store/retry.py, 60 s)


def plan(drill: str, *, steps: int, interval: int, num_nodes: int, seed: int) -> list[ChaosEvent]:
    """The chaos events of one drill; the seed picks the node and (within bounds) the step."""
    if drill == "demo":
        try:
            return demo_plan(steps=steps, interval=interval, num_nodes=num_nodes, seed=seed)
        except ValueError as err:
            raise SuperviseError(str(err), exit_code=2) from None
    rng = random.Random(f"{drill}:{seed}")
    node = rng.randrange(num_nodes)
    first_save, last_save = interval, (steps - 1) // interval * interval
    if last_save < first_save + interval or steps < interval + 3:
        raise SuperviseError(f"--steps {steps} with a checkpoint every {interval} leaves no room for drill "
                             f"{drill!r}: use at least {2 * interval + 3} steps", exit_code=2)
    mid = rng.choice([s for s in range(first_save + 1, last_save) if s % interval] or [first_save + 1])
    save = rng.choice(range(first_save + interval, last_save + 1, interval))  # a save with one committed before it
    if drill == "notice":
        return [ChaosEvent("notice", mid, node, 60.0)]
    if drill == "kill":
        return [ChaosEvent("kill", mid, node)]
    if drill == "kill-during-save":
        return [ChaosEvent("kill", save, node, during_save=True)]
    if drill == "notice-during-save":
        return [ChaosEvent("notice", save, node, 60.0, during_save=True)]
    if drill == "corrupt-newest":  # the corruption is found by the restart after a preemption
        return [ChaosEvent("kill", mid, node), ChaosEvent("corrupt", mid)]
    if drill == "stall-rank":
        return [ChaosEvent("stall", mid, node)]
    if drill == "store-outage":
        return [ChaosEvent("outage", save, during_save=True, duration_s=STORE_OUTAGE_S)]
    raise SuperviseError(f"unknown drill {drill!r}; use any of: {', '.join(DRILLS + DRILL_SETS)}", exit_code=2)


@dataclass
class Row:
    drill: str
    injected: list[str] = field(default_factory=list)  # what, at which observed step, when (s after launch)
    exit_codes: list[list[int]] = field(default_factory=list)  # per ended incarnation, the nodes' codes
    recoveries: int = 0
    steps_lost: int | None = None  # recomputed steps (ledger report)
    recovery_s: float | None = None
    verdict: str = "FAIL"
    why: str = ""


def resumes_lost_nothing(events: list, corrupted: set[int]) -> tuple[bool, str]:
    """Every restart resumed from the newest step committed before it started (or,
    when a drill corrupted that step, from an older committed one)."""
    committed: list[tuple[float, int]] = sorted((e.t, e.get("step")) for e in events if e.kind == "checkpoint_committed")
    for e in sorted((e for e in events if e.kind == "resume"), key=lambda e: e.t):
        before = [s for t, s in committed if t < e.t]
        newest = max([s for s in before if s not in corrupted], default=None)
        got = e.get("step")
        if newest is not None and (got is None or got < newest):
            return False, f"incarnation {e.incarnation} resumed from {got}, but step {newest} was committed before it"
    return True, "every restart resumed from the newest committed step"


def weights_match(url: str, ref_url: str, steps: int) -> tuple[bool, str]:
    """Final checkpoint of a run vs the reference's: every tensor, optimizer included, bit for bit."""
    from supervisor.store.catalog import Catalog
    from supervisor.titan.results import load_tensors, tensor_differences

    last, ref = Catalog(url).latest(), Catalog(ref_url).latest()
    if last.step != steps:
        return False, f"newest committed checkpoint is step {last.step}, not {steps}"
    if ref.step != steps:
        return False, f"the reference's newest committed checkpoint is step {ref.step}, not {steps}"
    ours, theirs = load_tensors(str(last.path), model_only=False), load_tensors(str(ref.path), model_only=False)
    differ = tensor_differences(ours, theirs)
    if differ or not ours:
        return False, f"{len(differ)} of {len(theirs)} tensors differ, e.g. {differ[0] if differ else '-'}"
    return True, f"step {steps}: {len(ours)} tensors bit-identical to the reference"


@dataclass
class Attempt:
    """One job of a drill session, as it ended: what ran, how it ended, what was injected."""

    drill: str
    events: list[ChaosEvent]
    spec: Any
    status: Any
    fired: list[dict]  # the controller's chaos records, plus the outages this session fired
    t0: float  # wall time of the launch


class Drill:
    """One drill session: a store (the embedded one unless --set checkpoint.bucket), jobs, rows.

    `kind` names the session ("drill", or "demo" for `supervise demo`) in its
    job names and its store's folder."""

    def __init__(self, recipe: str, *, steps: int, seed: int, sets: list[str], interval: int | None,
                 num_nodes: int | None = None, kind: str = "drill", log=lambda msg: None):
        self.recipe, self.steps, self.seed, self.sets, self.log = recipe, steps, seed, list(sets), log
        self.interval = interval or max(1, steps // 4)
        self.num_nodes = num_nodes
        self.id = f"{kind}-{uuid.uuid4().hex[:6]}"
        self.workdir: Path | None = None  # the embedded store's folder, once started
        self.store = None
        self.jobs: list[str] = []

    def spec(self, name: str):
        from supervisor.recipes import build_spec

        sets = [f"checkpoint.interval={self.interval}", f"overrides.training.steps={self.steps}",
                f"overrides.debug.seed={self.seed}", "overrides.debug.deterministic=true"]
        if not any(s.startswith("checkpoint.bucket=") for s in self.sets):
            sets.insert(0, f"checkpoint.bucket={self.store_url()}")
        return build_spec(self.recipe, name=name, num_nodes=self.num_nodes, sets=[*sets, *self.sets])

    def planned_interval(self) -> int:
        """Where the first incarnation saves, after every --set: the spec's interval, or
        auto's low end (ledger.interval.choose with nothing measured yet)."""
        ckpt = self.spec("probe").checkpoint
        return ckpt.interval_range[0] if ckpt.interval == "auto" else ckpt.interval

    def store_url(self) -> str:
        if self.store is None:
            import tempfile

            from supervisor.store.local_server import LocalObjectStore

            self.workdir = Path(tempfile.mkdtemp(prefix=f"supervise-{self.id}-"))
            self.store = LocalObjectStore(self.workdir / "s3")
            self.store.start()
            os.environ.update(self.store.env)  # the nodes inherit it; the checks in this process read through it
        return self.store.url()

    def run_job(self, name: str, events: list[ChaosEvent], *, drill: str = "",
                wait: Callable[[str, Any], Any] | None = None) -> Attempt:
        """Schedule the recipe with `events` on the local backend; `wait(name, spec)` (default:
        block) until it ends. The controller fires the node events; this session fires the
        store outages."""
        from supervisor.launch import dryrun, schedule
        from supervisor.launch.local import LocalBackend, read_state

        spec = self.spec(name)
        outages = [(i, ev) for i, ev in enumerate(events) if ev.kind in STORE_KINDS]
        impl, job = dryrun(spec, backend="local", chaos=events)  # the controller leaves outages alone
        if any(ev.kind == "stall" for ev in events):
            job.node_argv = replace(NodeOptions.from_argv(job.node_argv), hang_timeout_s=STALL_HANG_S).to_argv()
        self.jobs.append(name)
        done, fired = threading.Event(), []
        threads = [threading.Thread(target=self._outage, args=(spec.checkpoints_url, i, ev, done, fired), daemon=True)
                   for i, ev in outages]
        t0 = time.time()
        schedule(impl, job, spec)
        for t in threads:
            t.start()
        try:
            status = (wait or (lambda n, _spec: LocalBackend().wait(n)))(name, spec)
        finally:
            done.set()
            for t in threads:
                t.join()
        fired = [*(read_state(name) or {}).get("chaos_fired", []), *fired]
        return Attempt(drill or name, list(events), spec, status, fired, t0)

    def _outage(self, url: str, index: int, ev: ChaosEvent, done: threading.Event, fired: list) -> None:
        """Freeze the store once step `ev.at_step`'s save is landing in it."""
        from supervisor.store.fs import Store

        store = Store(url)
        while not done.wait(0.2):
            if save_in_progress(store, ev.at_step):
                t = time.time()
                detail = freeze_store(self.store.pid, ev.duration_s or STORE_OUTAGE_S, until=done)
                fired.append({"index": index, "kind": ev.kind, "node": None, "observed_step": ev.at_step,
                              "time": t, "detail": f"{detail} during the save of step {ev.at_step}"})
                return

    def judge(self, attempt: Attempt, ref_url: str) -> Row:
        """The row of an ended attempt against the reference run's checkpoints."""
        from supervisor.ledger.report import build_report
        from supervisor.ledger.journal import read_events

        st, fired, url = attempt.status, attempt.fired, attempt.spec.checkpoints_url
        ledger, _ = read_events(ledger_url(url))
        report = build_report(ledger_url(url))
        row = Row(attempt.drill, recoveries=st.recoveries, steps_lost=(report.get("steps") or {}).get("recomputed"),
                  recovery_s=report.get("recovery_s"))
        row.injected = [f"{c['kind']}{'' if c['node'] is None else ' node %s' % c['node']} at step "
                        f"{c['observed_step']} (+{c['time'] - attempt.t0:.0f} s): {c['detail']}" for c in fired]
        by_inc: dict[str, list[int]] = {}
        for e in ledger:
            if e.kind == "exit" and isinstance(e.get("code"), int):
                by_inc.setdefault(e.incarnation, []).append(e.get("code"))
        row.exit_codes = [codes for _, codes in sorted(by_inc.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0)]
        missed = [ev.describe() for i, ev in enumerate(attempt.events) if i not in {c["index"] for c in fired}]
        if st.state != SUCCEEDED:
            row.why = f"job {st.state}: {st.reason}"
        elif missed:
            row.why = f"not injected: {', '.join(missed)} (the run ended first)"
        else:
            corrupted = {int(c["detail"].split("of step ")[1].split()[0]) for c in fired
                         if c["kind"] == "corrupt" and "of step " in c["detail"]}
            ok, why = resumes_lost_nothing(ledger, corrupted)
            if ok:
                ok, why = weights_match(url, ref_url, self.steps)
            row.verdict, row.why = ("PASS" if ok else "FAIL"), why
        return row

    def row(self, drill: str, events: list[ChaosEvent], ref_url: str) -> Row:
        self.log(f"drill {drill}: " + "; ".join(ev.describe() for ev in events))
        return self.judge(self.run_job(f"{self.id}-{drill}", events, drill=drill), ref_url)

    def plans(self, drills: list[str]) -> dict[str, list[ChaosEvent]]:
        num_nodes = self.spec("probe").num_nodes
        plans = {d: plan(d, steps=self.steps, interval=self.planned_interval(), num_nodes=num_nodes, seed=self.seed)
                 for d in drills}
        if self.store is None and any(ev.kind in STORE_KINDS for evs in plans.values() for ev in evs):
            raise SuperviseError("drill store-outage freezes the drill's own embedded store: "
                                 "drop --set checkpoint.bucket to run it", exit_code=2)
        return plans

    def run(self, drills: list[str], *, combined: bool) -> list[Row]:
        plans = self.plans(drills)
        self.log(f"reference: {self.recipe}, {self.steps} steps, uninterrupted")
        ref = self.run_job(f"{self.id}-ref", [])
        if ref.status.state != SUCCEEDED:
            raise SuperviseError(f"the reference run did not finish ({ref.status.state}: {ref.status.reason}); "
                                 f"see `supervise logs {self.id}-ref`", exit_code=1)
        if combined:
            events = sorted((ev for evs in plans.values() for ev in evs), key=lambda ev: ev.at_step)
            return [self.row("combined", events, ref.spec.checkpoints_url)]
        return [self.row(d, evs, ref.spec.checkpoints_url) for d, evs in plans.items()]

    def cleanup(self, *, keep: bool = False) -> None:
        """Stop what is still running; unless `keep`, forget the jobs and remove the store."""
        from supervisor.launch.base import is_terminal
        from supervisor.launch.local import LocalBackend

        backend = LocalBackend()
        for name in self.jobs:
            found = backend.status(name)
            if found and not is_terminal(found[0].state):
                backend.cancel(name, graceful=False)
            if not keep:
                backend.forget(name)
        if self.store is not None and not keep:
            import shutil

            self.store.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)


def drill_command(
    recipe: str = typer.Argument("llama3_debug", help="Recipe YAML file or bundled recipe name (run as given, on CPU here)."),
    backend: str = typer.Option("local", "--backend", help="Where the drills run (local only, for now)."),
    drills: str = typer.Option(",".join(DRILLS), "--drills",
                               help=f"Comma-separated: {', '.join(DRILLS)}; or demo (the demo's plan: a notice, "
                                    "then a kill whose restart finds the newest checkpoint corrupt)."),
    steps: int = typer.Option(12, "--steps", min=5, help="Training steps of every run."),
    interval: Optional[int] = typer.Option(None, "--interval", min=1, help="Checkpoint interval (default: steps / 4)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the drills' steps and nodes, and of training."),
    combined: bool = typer.Option(False, "--combined", help="One run with every drill's events instead of one run each."),
    sets: list[str] = typer.Option([], "--set", help="Recipe overrides, as for start (e.g. checkpoint.bucket=s3://...)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as a JSON list."),
) -> None:
    """Inject spot failures into real runs of RECIPE; PASS only if the final weights match an uninterrupted run."""
    if backend != "local":
        raise SuperviseError(f"--backend {backend!r}: drills run on the local backend only", exit_code=2)
    chosen = [d.strip() for d in drills.split(",") if d.strip()]
    unknown = [d for d in chosen if d not in DRILLS + DRILL_SETS]
    if unknown or not chosen:
        raise SuperviseError(f"--drills: unknown {unknown[0]!r}; use any of: {', '.join(DRILLS + DRILL_SETS)}" if unknown
                             else "--drills: name at least one drill", exit_code=2)
    from rich.console import Console

    console = Console(stderr=True) if as_json else Console()
    session = Drill(recipe, steps=steps, seed=seed, sets=sets, interval=interval, log=console.print)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a SIGTERM still stops the jobs and the store
    try:
        rows = session.run(chosen, combined=combined)
    finally:
        session.cleanup()
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in rows]))
    else:
        from rich.table import Table

        table = Table("DRILL", "INJECTED", "EXIT CODES", "RECOVERIES", "STEPS LOST", "RECOVERY", "VERDICT")
        for r in rows:
            table.add_row(r.drill, "\n".join(r.injected) or "-", " ".join(map(str, r.exit_codes)) or "-",
                          str(r.recoveries), "-" if r.steps_lost is None else str(r.steps_lost),
                          "-" if r.recovery_s is None else f"{r.recovery_s:.0f} s",
                          f"[{'green' if r.verdict == 'PASS' else 'red'}]{r.verdict}[/]: {r.why}")
        console.print(table)
    raise typer.Exit(0 if all(r.verdict == "PASS" for r in rows) else 1)
