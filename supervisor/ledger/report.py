"""`supervise report NAME|URL`: goodput, badput and cost of a run across its recoveries.

Exit codes: 0 report shown (possibly partial: skipped lines are listed), 1 nothing
to report (no journal, no events), 2 bad input (unknown name, unreadable price file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from supervisor.errors import SuperviseError
from supervisor.contract.layout import LEDGER_DIR


def ledger_url_of(target: str) -> str:
    """NAME (from the job registry), checkpoint URL or path, or the ledger URL itself -> ledger URL."""
    from supervisor import registry

    if "://" not in target and not Path(target).exists():
        job = registry.lookup(target)
        if not job or not job.get("checkpoints_url"):
            raise SuperviseError(f"no job named {target!r} and no such path: pass a job name from "
                                 "`supervise status` or the run's checkpoint URL (s3://bucket/run)")
        target = job["checkpoints_url"]
    target = target.rstrip("/")
    return target if target.endswith("/" + LEDGER_DIR) or target == LEDGER_DIR else f"{target}/{LEDGER_DIR}"


def build_report(ledger_url: str, *, plot: str | Path | None = None, price_file: str | Path | None = None,
                 spot_price: float | None = None, on_demand_price: float | None = None,
                 backend_events: tuple[list, list[str]] | None = None, policy=None) -> dict[str, Any]:
    """Read the journal and compute the report object (plus the PNG when `plot` is given).

    `backend_events`: (events, problems) from the backend's own record of the job
    (ledger.skypilot.job_events), merged into the journal's. The ledger is read through
    merged.run_events, like status and `interval: auto`: the newest run under the name,
    node losses nobody wrote down counted as preemptions. Never raises on a bad or
    missing journal; `report["events"] == 0` means there was nothing to report.
    """
    from supervisor.ledger.merged import run_events
    from supervisor.ledger.prices import price_for
    from supervisor.ledger.timeline import build_timeline, summarize

    # policy: the store's retry policy (default PATIENT)
    events, problems, run = run_events(ledger_url, backend_events=backend_events, policy=policy)
    def price_of(res: dict) -> Any:
        """Each start at its own resources (timeline.start_resources); unknown ones are not priced as a CPU."""
        if res.get("resources_from") is None and (spot_price is None or on_demand_price is None):
            return None
        return price_for(res.get("accelerators"), cloud=res.get("cloud"), region=res.get("region"),
                         price_file=price_file, spot=spot_price, on_demand=on_demand_price,
                         prefer_spot=res.get("spot") is not False)

    report = summarize(events, problems, price_of=price_of) if events else {"events": 0, "problems": problems}
    if events:
        report["setups"] = setup_runs(events, report["interruptions"])
    report["ledger"] = ledger_url
    report["run"] = run.as_json()
    report["plot"] = None
    report["weights_match"] = None  # only a run with a reference (the demo) can compare; same keys as the demo
    if plot is not None and events:
        from supervisor.ledger.plot import plot_timeline

        report["plot"] = str(plot_timeline(events, report, plot, timeline=build_timeline(events)))
    return report


def setup_runs(events: list, interruptions: list[dict]) -> list[dict]:
    """Each node's setup in time order, labelled with the start it prepared (0 = the first,
    n = after the n-th loss), how it got its environment (ledger.mark's `how`) and, after a
    full install, what became of its snapshot."""
    losses = sorted(ep["t_loss"] for ep in interruptions)
    return [{"start": sum(t < e.t for t in losses), "node_rank": e.get("node_rank"), "how": e.get("how") or "?",
             "duration_s": e.get("duration_s"), **({"snapshot": e.get("snapshot")} if e.get("snapshot") else {})}
            for e in events if e.kind == "setup"]


def _setups_note(report: dict[str, Any], recoveries: bool) -> str:
    """' (node0 installed 65.0 s)' for the first start; ' (#1 node0 restored 12.0 s, ...)' for recoveries."""
    runs = [r for r in report.get("setups", []) if (r["start"] > 0) == recoveries]
    if not runs:
        return ""
    shown = [f"{'#' + str(r['start']) + ' ' if recoveries else ''}node{r['node_rank']} {r['how']} "
             f"{_fmt_s(r['duration_s'])}" for r in runs]
    return " (" + ", ".join(shown) + ")"


def backend_events_of(target: str) -> tuple[list, list[str]] | None:
    """The backend's own record of a job named `target` (SkyPilot's), or None for other targets."""
    from supervisor import registry

    if "://" in target or Path(target).exists():
        return None
    job = registry.lookup(target) or {}
    if job.get("backend") != "skypilot":
        return None
    if not str(job.get("job_id") or "").isdigit():
        return [], [f"no SkyPilot job id recorded for {target!r}: queue, provisioning and detection come "
                    "from the journal alone"]
    from supervisor.ledger.skypilot import job_events

    return job_events(int(job["job_id"]))


def _starts_note(starts: list[dict]) -> str:
    """'#0 aws/us-east-1 0.500 node-h $1.50; #1 ... (#1 priced with the run's resources: ...)'."""
    shown = [f"#{s['start']} {'/'.join(p for p in (s.get('cloud'), s.get('region')) if p) or '?'} "
             f"{s['node_hours']:.3f} node-h ${s['cost']['spot_usd']:.2f}" for s in starts]
    guessed = [f"#{s['start']}" for s in starts if s["resources_from"] == "run"]
    return "; ".join(shown) + (f" ({', '.join(guessed)} priced with the run's resources: no record of where "
                               "that launch landed)" if guessed else "")


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


def render(report: dict[str, Any]):
    """A rich renderable of the report, for `report` and the end of `demo`."""
    from rich.console import Group
    from rich.table import Table

    wall = report["wall_s"] or 0.0
    gp = report.get("goodput")
    time_table = Table(title=f"run ledger · goodput {gp * 100:.1f}% · {report.get('state')}" if gp is not None
                       else "run ledger", title_justify="left")
    time_table.add_column("where the wall time went")
    time_table.add_column("time", justify="right")
    time_table.add_column("share", justify="right")
    b = report["breakdown"]
    start, rec = report["phases"]["start"], report["phases"]["recovery"]
    rows = [
        ("productive training", report["productive_s"], ""),
        ("checkpoint save + commit", report["checkpoint_s"], ""),
        ("lost work (recomputed)", report["lost_s"], f"{report['steps']['recomputed']} steps"),
        ("recovery", report["recovery_s"], f"detect {_fmt_s(rec['detection_s'])}, shut down after a notice save "
         f"{_fmt_s(rec['shutdown_s'])}, TorchTitan start-up {_fmt_s(rec['startup_s'])}, checkpoint load "
         f"{_fmt_s(rec['checkpoint_load_s'])}, first step {_fmt_s(rec['first_step_s'])}"),
        ("queue / provisioning / start-up", report["queue_s"],
         f"queue {_fmt_s(start['queue_s'])}, provisioning {_fmt_s(start['provisioning_s'])}, setup "
         f"{_fmt_s(start['setup_s'])}{_setups_note(report, False)}, first start-up to step 1 {_fmt_s(start['startup_s'] + start['checkpoint_load_s'] + start['first_step_s'])}, "
         f"re-provisioning {_fmt_s(rec['provisioning_s'] + rec['queue_s'])} + setup {_fmt_s(rec['setup_s'])}{_setups_note(report, True)}, "
         f"tear-down {_fmt_s(b['teardown_s'])}"),
    ]
    for label, value, note in rows:
        share = f"{value / wall * 100:.1f}%" if wall else "-"
        time_table.add_row(label + (f"  [dim]{note}[/]" if note else ""), _fmt_s(value), share)
    time_table.add_row("[bold]wall[/]", f"[bold]{_fmt_s(wall)}[/]", "100%")

    facts = Table(show_header=False, box=None)
    facts.add_column(style="bold")
    facts.add_column()
    pre = report["preemptions"]
    facts.add_row("preemptions", f"{pre['notice']} with notice, {pre['no_notice']} without; "
                  f"{report['failures']} other failure(s); {report['recoveries']} recoveries")
    st = report["steps"]
    facts.add_row("steps", f"{st['first']} → {st['last']}, {st['productive']} kept, {st['recomputed']} recomputed"
                  + (f", {st['mean_step_s']:.3f} s/step" if st.get("mean_step_s") else ""))
    ck = report["checkpoints"]
    if ck["mean_cost_s"] is not None:
        facts.add_row("checkpoints", f"{ck['saved']} saved, {ck['committed']} committed, "
                      f"{ck['mean_cost_s']:.2f} s each (save + commit)")
    cost = report.get("cost")
    if cost:
        facts.add_row("cost", f"{report['nodes']} × {report['accelerators']} for {cost['node_hours']:.3f} node-h: "
                      f"${cost['spot_usd']:.2f} spot vs ${cost['on_demand_usd']:.2f} on demand "
                      f"(saved ${cost['savings_usd']:.2f}; badput ${cost['badput_spot_usd']:.2f})")
        facts.add_row("prices", f"${cost['spot_usd_per_node_hour']:.3f}/h spot, "
                      f"${cost['on_demand_usd_per_node_hour']:.3f}/h on demand — {cost['price_source']}")
        starts = report.get("incarnations") or []
        if len(starts) > 1:
            facts.add_row("per start", _starts_note(starts))
    else:
        facts.add_row("cost", "unknown: the ledger has no launch event, so what ran is not recorded "
                      "(pass --spot-price and --on-demand-price)")
    facts.add_row("advice", report["advice"]["message"])
    if report.get("plot"):
        facts.add_row("plot", report["plot"])
    return Group(time_table, facts)


def report_command(
    target: str = typer.Argument(..., metavar="NAME|URL", help="Job name, or the run's checkpoint URL/path."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a timeline PNG to this file."),
    prices: Optional[Path] = typer.Option(None, "--prices", help="YAML/JSON price file (see docs/ledger.md)."),
    spot_price: Optional[float] = typer.Option(None, "--spot-price", help="Spot USD per node-hour."),
    on_demand_price: Optional[float] = typer.Option(None, "--on-demand-price", help="On-demand USD per node-hour."),
) -> None:
    """Goodput, badput and cost of a run across all its recoveries, from its ledger."""
    from rich.console import Console

    if prices is not None and not prices.is_file():
        raise SuperviseError(f"price file {prices} does not exist")
    from supervisor.store import retry

    url = ledger_url_of(target)
    report = build_report(url, plot=plot, price_file=prices, spot_price=spot_price, on_demand_price=on_demand_price,
                          backend_events=backend_events_of(target), policy=retry.BRIEF)  # a view: gives up in seconds
    err = Console(stderr=True)
    if as_json:
        typer.echo(json.dumps(report, default=str))
    elif report["events"]:
        Console().print(render(report))
    for problem in report["problems"]:
        err.print(f"[yellow]warning:[/] {problem}", highlight=False)
    if not report["events"]:
        err.print(f"nothing to report: no readable events at {report['ledger']}", highlight=False)
        raise typer.Exit(1)
