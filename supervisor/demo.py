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

import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer

from supervisor.errors import SuperviseError
from supervisor.launch.base import SUCCEEDED, is_terminal
from supervisor.runtime import ledger_url


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


@dataclass
class DemoRun:
    name: str
    url: str
    state: str = "PENDING"
    reason: str | None = None
    wall_s: float = 0.0
    chaos: list = field(default_factory=list)


class Demo:
    def __init__(self, cfg: DemoConfig):
        from rich.console import Console

        self.cfg = cfg
        self.console = Console(stderr=cfg.quiet, quiet=cfg.quiet)
        self.id = f"demo-{uuid.uuid4().hex[:6]}"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"supervise-{self.id}-"))
        self.store = None
        self.jobs: list[str] = []

    # ---- set-up ----

    def start_store(self) -> None:
        from supervisor.store.local_server import LocalObjectStore

        self.store = LocalObjectStore(self.workdir / "s3")
        self.store.start()
        os.environ.update(self.store.env)  # the catalog, ledger and report in this process
        self.console.print(f"[bold]object store[/] SeaweedFS at {self.store.endpoint} (bucket s3://{self.store.bucket})")

    # ---- one job ----

    def spec(self, name: str):
        """The llama3_debug recipe, as `supervise start` reads it, with the demo's --set overrides."""
        from supervisor.recipes import build_spec

        cfg = self.cfg
        return build_spec("llama3_debug", name=name, num_nodes=cfg.nodes, sets=[
            f"checkpoint.bucket={self.store.url()}",
            *([f"checkpoint.interval={cfg.interval}"] if cfg.interval_auto is None else
              ["checkpoint.interval=auto", "checkpoint.interval_range=[{},{}]".format(*cfg.interval_auto)]),
            f"overrides.training.steps={cfg.steps}",
            f"overrides.debug.seed={cfg.seed}",
            "overrides.debug.deterministic=true",  # the reference run must compute the same numbers
        ])

    def run_job(self, name: str, plan: list, title: str) -> DemoRun:
        from supervisor.launch import submit
        from supervisor.launch.local import LocalBackend

        spec = self.spec(name)
        self.jobs.append(name)
        t0 = time.monotonic()
        submit(spec, backend="local", chaos=plan)
        launcher = LocalBackend()
        if self.cfg.quiet:
            st = launcher.wait(name)
        else:
            st = self.watch(launcher, name, spec.checkpoints_url, plan, title)
        run = DemoRun(name, spec.checkpoints_url, st.state, st.reason, time.monotonic() - t0, plan)
        if st.state != SUCCEEDED:
            self.console.print(f"[red]job {name} {st.state}[/]: {st.reason} (see `supervise logs {name}`)")
        return run

    def watch(self, launcher, name: str, url: str, plan: list, title: str):
        """Live view: state, step, loss and the newest ledger events, until the job ends."""
        from rich.live import Live

        from supervisor.launch.local import read_state

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

        progress = [e for e in events if e.kind == "progress"]
        step = max([state.get("step") or 0] + [e.get("step", 0) for e in progress])
        loss = progress[-1].get("loss") if progress else None
        head = Table.grid(padding=(0, 2))
        head.add_row(
            f"[bold]{title}[/]",
            f"state [bold]{st.state}[/]",
            f"step [bold]{step}[/]/{self.cfg.steps}",
            f"loss [bold]{loss:.4f}[/]" if isinstance(loss, (int, float)) else "loss -",
            f"recoveries [bold]{st.recoveries}[/]",
            f"{elapsed:5.0f} s",
        )
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
            details = ", ".join(f"{k}={v}" for k, v in e.fields.items()
                                if k in ("step", "reason", "with_notice", "saved_step", "code", "duration_s",
                                         "action", "state", "source", "skipped") and v not in (None, []))
            table.add_row(f"{e.t - t0:6.1f}", e.writer, e.incarnation, e.kind, details[:90])
        rows.append(table)
        return Group(*rows)

    # ---- the whole thing ----

    def run(self) -> dict[str, Any]:
        from supervisor import registry
        from supervisor.launch.chaos import demo_plan
        from supervisor.ledger.cli import build_report, render

        cfg = self.cfg
        plan = demo_plan(steps=cfg.steps, interval=cfg.interval, num_nodes=cfg.nodes, seed=cfg.seed) if cfg.chaos else []
        self.start_store()

        what = (f"recipe llama3_debug · {cfg.nodes} nodes × 1 CPU rank (gloo) · {cfg.steps} steps · "
                f"checkpoint every {cfg.interval} · local backend (setup builds a tiny corpus and tokenizer per node)")
        self.console.print(f"[bold]job[/] {self.id}: {what}")
        main = self.run_job(self.id, plan, "chaos run" if plan else "run")
        ref = None
        if plan and main.state == SUCCEEDED:
            self.console.print("[bold]reference[/]: the same job without chaos, for the final weight check")
            ref = self.run_job(f"{self.id}-ref", [], "reference run")

        plot = cfg.plot or registry.home() / "demo" / f"{self.id}.png"
        plot.parent.mkdir(parents=True, exist_ok=True)
        report = build_report(ledger_url(main.url), plot=plot)
        try:
            match, why = self.check(main, ref)
        except Exception as err:  # the verdict must still be printed, and be FAIL
            match, why = False, f"could not compare the weights: {err!r}"
        report.update(weights_match=match, weights_check=why, plot=report.get("plot"), job=self.id,
                      seed=cfg.seed, steps_planned=cfg.steps, chaos_plan=[ev.describe() for ev in plan],
                      job_state=main.state, reference_state=ref.state if ref else None)
        if cfg.keep:
            report["kept"] = {"endpoint": self.store.endpoint, "store_pid": self.store.pid,
                              "workdir": str(self.workdir), "env": self.store.env,
                              "jobs": list(self.jobs)}
        if report.get("events"):
            self.console.print(render(report))
        verdict = "[green]PASS[/]" if match else "[red]FAIL[/]"
        self.console.print(f"[bold]final check[/] {verdict}: {why}")
        self.console.print(f"[bold]plot[/] {report.get('plot')}")
        return report

    def check(self, main: DemoRun, ref: DemoRun | None) -> tuple[bool, str]:
        """Weights at the last step vs the reference run's (or trivially, without chaos):
        the same check as `supervise drill`."""
        from supervisor.drill import weights_match
        from supervisor.store.catalog import Catalog

        if main.state != SUCCEEDED:
            return False, f"the job did not finish ({main.state}: {main.reason})"
        if ref is None:
            last = Catalog(main.url).latest()
            if last.step != self.cfg.steps:
                return False, f"newest committed checkpoint is step {last.step}, not {self.cfg.steps}"
            return True, "no chaos: this uninterrupted run is its own reference"
        if ref.state != SUCCEEDED:
            return False, f"the reference run did not finish ({ref.state}: {ref.reason})"
        ok, why = weights_match(main.url, ref.url, self.cfg.steps)
        return ok, f"vs uninterrupted reference: {why}"

    def cleanup(self) -> None:
        from supervisor.launch.local import LocalBackend

        launcher = LocalBackend()
        for name in self.jobs:
            st = launcher.status(name)[0]
            if not is_terminal(st.state):
                launcher.cancel(name, graceful=False)
        if self.cfg.keep:
            env = " ".join(f"{k}={v}" for k, v in self.store.env.items()) if self.store else ""
            self.console.print(f"[bold]kept[/] store pid {self.store.pid if self.store else '-'} data {self.workdir}")
            self.console.print(f"  inspect: {env} supervise report {self.id}")
            self.console.print(f"  stop the store: kill {self.store.pid if self.store else '-'}")
            return
        for name in self.jobs:
            launcher.forget(name)
        if self.store is not None:
            self.store.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


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
