"""`supervise demo`: the whole product on one machine, no cloud account.

An embedded S3 server (SeaweedFS); the llama3_debug recipe launched the way
`supervise start --backend local` launches it (its setup builds a tiny corpus
and tokenizer on every node; TorchTitan trains the llama3 debug model on CPU
as a 2-node job of the local managed-job backend); a seeded chaos plan (a
preemption with notice, one without, and a corrupt newest checkpoint found on
the restart), live progress, the ledger report and its timeline PNG, and a
final check: the weights equal those of the same job run without interruption
(same recipe, data, seed, topology).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from supervisor.errors import SuperviseError
from supervisor.launch.base import SUCCEEDED, is_terminal
from supervisor.contract.layout import ledger_url


@dataclass
class DemoConfig:
    steps: int = 24
    seed: int = 0
    chaos: bool = True
    keep: bool = False
    interval: int = 6  # checkpoint every N steps (and what the chaos plan is built for)
    interval_auto: tuple[int, int] | None = None  # checkpoint.interval auto in [low, high] (docs/ledger.md)
    nodes: int = 2
    plot: Path | None = None
    quiet: bool = False  # --json: nothing but the final object on stdout


class Demo:
    """The demo is one drill set (`supervise drill --drills demo`) with a live view and
    the ledger report: a `Drill` session runs its store, jobs and verdict."""

    def __init__(self, cfg: DemoConfig):
        from rich.console import Console

        from supervisor.drill import Drill

        self.cfg = cfg
        self.console = Console(stderr=cfg.quiet, quiet=cfg.quiet)
        self.console.soft_wrap = not self.console.is_terminal  # piped: a line stays one line
        auto = [] if cfg.interval_auto is None else [
            "checkpoint.interval=auto", "checkpoint.interval_range=[{},{}]".format(*cfg.interval_auto)]
        self.session = Drill("llama3_debug", steps=cfg.steps, seed=cfg.seed, sets=auto, interval=cfg.interval,
                             num_nodes=cfg.nodes, kind="demo")
        self.id = self.session.id

    def run_job(self, name: str, plan: list, title: str):
        """One job of the demo's session, watched live unless --json."""
        from supervisor.launch.local import LocalBackend

        wait = None if self.cfg.quiet else (
            lambda n, spec: self.watch(LocalBackend(), n, spec.checkpoints_url, plan, title))
        run = self.session.run_job(name, plan, drill="demo" if plan else "", wait=wait)
        if run.status.state != SUCCEEDED:
            self.console.print(f"[red]job {name} {run.status.state}[/]: {run.status.reason} "
                               f"(see `supervise logs {name}`)")
        return run

    def watch(self, launcher, name: str, url: str, plan: list, title: str):
        """Live view: state, step, loss and the newest ledger events, until the job ends.
        Piped (not a terminal): one line per ledger event and per status change instead."""
        from rich.live import Live

        from supervisor.launch.local import read_state

        if not self.console.is_terminal:
            return self.log(launcher, name, url, title)
        t0 = time.monotonic()
        events: list = []
        last_read = 0.0
        with Live(console=self.console, refresh_per_second=4, transient=False) as live:
            while True:
                st = launcher.status(name)[0]
                if time.monotonic() - last_read > 1.0 or is_terminal(st.state):
                    last_read = time.monotonic()
                    events = self.read_ledger(url)
                live.update(self.view(title, st, read_state(name) or {}, events, plan, time.monotonic() - t0))
                if is_terminal(st.state):
                    return st
                time.sleep(0.25)

    def log(self, launcher, name: str, url: str, title: str):
        """The live view for a pipe or a file: nothing is redrawn, each line stands alone."""
        from supervisor.launch.local import read_state

        t0, seen = time.monotonic(), set()
        said_status, said_step, said_at = None, None, 0.0
        while True:
            st = launcher.status(name)[0]
            events = self.read_ledger(url)
            for e in events:
                key = (e.writer, e.incarnation, e.kind, e.t)
                if e.kind != "progress" and key not in seen:
                    seen.add(key)
                    self.console.print(f"  {e.t - events[0].t:7.1f}  {e.writer}  {e.incarnation}  {e.kind}  "
                                       f"{_details(e)}", soft_wrap=True, highlight=False, markup=False)
            step, loss = _step_and_loss(read_state(name) or {}, events)
            status = (st.state, st.recoveries)
            if status != said_status or (step != said_step and time.monotonic() - said_at >= 5.0):
                said_status, said_step, said_at = status, step, time.monotonic()
                self.console.print(f"{title}: {st.state}, step {step}/{self.cfg.steps}, {loss}, "
                                   f"recoveries {st.recoveries}, {time.monotonic() - t0:.0f} s",
                                   soft_wrap=True, highlight=False, markup=False)
            if is_terminal(st.state):
                return st
            time.sleep(1.0)

    @staticmethod
    def read_ledger(url: str) -> list:
        from supervisor.ledger.journal import read_events

        try:
            return read_events(ledger_url(url))[0]
        except Exception:  # a live view must not die on a half-written journal
            return []

    def view(self, title: str, st, state: dict, events: list, plan: list, elapsed: float):
        from rich.console import Group
        from rich.table import Table

        step, loss = _step_and_loss(state, events)
        head = Table.grid(padding=(0, 2))
        head.add_row(f"[bold]{title}[/]", f"state [bold]{st.state}[/]", f"step [bold]{step}[/]/{self.cfg.steps}",
                     loss, f"recoveries [bold]{st.recoveries}[/]", f"{elapsed:5.0f} s")
        fired = {c.get("index") for c in state.get("chaos_fired", [])}
        rows = [head]
        if plan:
            rows.append("chaos: " + "  ".join(
                f"[{'green' if i in fired else 'dim'}]{'✓' if i in fired else '·'} {ev.describe()}[/]"
                for i, ev in enumerate(plan)))
        table = Table(show_header=True, box=None, padding=(0, 1))
        for col in ("t", "writer", "incarnation", "event", "details"):
            table.add_column(col)
        t0 = events[0].t if events else 0.0
        for e in [e for e in events if e.kind != "progress"][-8:]:
            table.add_row(f"{e.t - t0:6.1f}", e.writer, e.incarnation, e.kind, _details(e)[:90])
        rows.append(table)
        return Group(*rows)

    # ---- the whole thing ----

    def run(self) -> dict[str, Any]:
        from dataclasses import asdict

        from supervisor import registry
        from supervisor.drill import plan as drill_plan
        from supervisor.ledger.report import build_report, render

        cfg, session = self.cfg, self.session
        plan = drill_plan("demo", steps=cfg.steps, interval=session.planned_interval(), num_nodes=cfg.nodes,
                          seed=cfg.seed) if cfg.chaos else []
        session.store_url()
        store = session.store
        self.console.print(f"[bold]object store[/] SeaweedFS at {store.endpoint} (bucket s3://{store.bucket})")

        what = (f"recipe llama3_debug · {cfg.nodes} nodes × 1 CPU rank (gloo) · {cfg.steps} steps · "
                f"checkpoint every {cfg.interval} · local backend (setup builds a tiny corpus and tokenizer per node)")
        self.console.print(f"[bold]job[/] {self.id}: {what}")
        main = self.run_job(self.id, plan, "chaos run" if plan else "run")
        ref = None
        if plan and main.status.state == SUCCEEDED:
            self.console.print("[bold]reference[/]: the same job without chaos, for the final weight check")
            ref = self.run_job(f"{self.id}-ref", [], "reference run")

        plot = cfg.plot or registry.home() / "demo" / f"{self.id}.png"
        plot.parent.mkdir(parents=True, exist_ok=True)
        url = main.spec.checkpoints_url
        report = build_report(ledger_url(url), plot=plot)
        try:
            row = self.check(main, ref)
        except Exception as err:  # the verdict must still be printed, and be FAIL
            from supervisor.drill import Row

            row = Row("demo", why=f"could not compare the weights: {err!r}")
        match = row.verdict == "PASS"
        report.update(weights_match=match, weights_check=row.why, drill=asdict(row), plot=report.get("plot"),
                      job=self.id, seed=cfg.seed, steps_planned=cfg.steps, chaos_plan=[ev.describe() for ev in plan],
                      job_state=main.status.state, reference_state=ref.status.state if ref else None)
        if cfg.keep:
            report["kept"] = {"endpoint": store.endpoint, "store_pid": store.pid, "workdir": str(session.workdir),
                              "env": store.env, "jobs": list(session.jobs)}
        if report.get("events"):
            self.console.print(render(report))
        verdict = "[green]PASS[/]" if match else "[red]FAIL[/]"
        self.console.print(f"[bold]final check[/] {verdict}: {row.why}")
        self.console.print(f"[bold]plot[/] {report.get('plot')}")
        return report

    def check(self, main, ref):
        """The drill's verdict on the chaos run against the reference (`supervise drill`'s
        rules: every event injected, no committed step lost, bit-identical weights); without
        chaos the run is its own reference."""
        from supervisor.drill import Row
        from supervisor.store.catalog import Catalog

        if ref is None and main.status.state == SUCCEEDED:
            last = Catalog(main.spec.checkpoints_url).latest()
            if last.step != self.cfg.steps:
                return Row("run", why=f"newest committed checkpoint is step {last.step}, not {self.cfg.steps}")
            return Row("run", verdict="PASS", why="no chaos: this uninterrupted run is its own reference")
        if ref is not None and ref.status.state != SUCCEEDED:
            return Row("demo", why=f"the reference run did not finish ({ref.status.state}: {ref.status.reason})")
        row = self.session.judge(main, ref.spec.checkpoints_url if ref else "")
        if row.verdict == "PASS":
            row.why = f"vs uninterrupted reference: {row.why}"
        return row

    def cleanup(self) -> None:
        session, keep = self.session, self.cfg.keep
        session.cleanup(keep=keep)
        if keep and session.store is not None:
            store = session.store
            env = " ".join(f"{k}={v}" for k, v in store.env.items())
            self.console.print(f"[bold]kept[/] store pid {store.pid} data {session.workdir}")
            self.console.print(f"  inspect: {env} supervise report {self.id}")
            self.console.print(f"  stop the store: kill {store.pid}")


def _details(e) -> str:
    """The fields of a ledger event a person watching the demo reads."""
    return ", ".join(f"{k}={v}" for k, v in e.fields.items()
                     if k in ("step", "reason", "with_notice", "saved_step", "code", "duration_s",
                              "action", "state", "source", "skipped") and v not in (None, []))


def _step_and_loss(state: dict, events: list) -> tuple[int, str]:
    """The step reached, and the newest reported loss with its own step when that is an
    earlier one (the trainer reports loss every few steps, never a stale value as current)."""
    progress = [e for e in events if e.kind == "progress" and isinstance(e.get("loss"), (int, float))]
    step = max([state.get("step") or 0] + [e.get("step", 0) for e in events if e.kind == "progress"])
    if not progress:
        return step, "loss -"
    newest = max(progress, key=lambda e: (e.get("step", 0), e.t))
    at = "" if newest.get("step") == step else f" (step {newest.get('step')})"
    return step, f"loss {newest.get('loss'):.4f}{at}"


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    demo = Demo(cfg)
    try:
        return demo.run()
    finally:
        demo.cleanup()


def demo_command(
    steps: int = typer.Option(24, "--steps", min=1, help="Training steps (with chaos at least 5)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the chaos plan and of the training run."),
    no_chaos: bool = typer.Option(False, "--no-chaos", help="Run without injected faults."),
    keep: bool = typer.Option(False, "--keep", help="Leave the object store running and the run's files for inspection."),
    as_json: bool = typer.Option(False, "--json", help="Print only the final report as one JSON object."),
    interval: Optional[int] = typer.Option(None, "--interval", min=1, help="Checkpoint interval in steps (default: steps / 4)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Where to write the timeline PNG."),
) -> None:
    """Train a tiny llama3 on this machine through preemptions and a corrupt checkpoint; report what they cost."""
    import json

    from supervisor.launch.chaos import min_demo_steps

    interval = interval or max(1, steps // 4)
    if not no_chaos and steps < min_demo_steps(interval):
        raise SuperviseError(f"--steps {steps} is too short for the chaos plan with a checkpoint every {interval} "
                             f"step(s): use at least {min_demo_steps(interval)}, or --no-chaos")
    report = run_demo(DemoConfig(steps=steps, seed=seed, chaos=not no_chaos, keep=keep, interval=interval,
                                 plot=plot, quiet=as_json))
    if as_json:
        typer.echo(json.dumps(report, default=str))
    ok = bool(report.get("weights_match")) and bool(report.get("plot")) and Path(report["plot"]).is_file()
    raise typer.Exit(0 if ok else 1)
