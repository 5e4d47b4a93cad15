"""`supervise start | status | logs | stop`: the front door and the views.

`start` renders a recipe into a job of a backend (a SkyPilot managed job, or
the local emulator) through `supervisor.launch.submit`'s path. `status`, `logs` and
`stop` look the name up in the job registry and dispatch to the backend that
runs it (local emulator or SkyPilot); `status` adds what only the bucket
knows: the latest committed step, when it was saved, and goodput so far.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Optional

import typer

from supervisor import registry
from supervisor.contract.layout import bucket_root
from supervisor.errors import SuperviseError
from supervisor.launch import get_backend
from supervisor.launch.base import AlreadyFinished, JobStatus, shown_reason


def start(
    recipe: str = typer.Argument(..., help="Recipe YAML file, or a bundled recipe name (llama3_8b)."),
    backend: str = typer.Option("skypilot", "--backend", help="Where to run: skypilot (managed job) or local (this machine, the managed-job emulator)."),
    spot: bool = typer.Option(False, "--spot", help="Use spot capacity (recovered by SkyPilot on preemption)."),
    name: Optional[str] = typer.Option(None, "--name", help="Job name (default: the recipe's)."),
    sets: list[str] = typer.Option([], "--set", help="Override any recipe field: key=value (nested: a.b=c)."),
    infra: Optional[str] = typer.Option(None, "--infra", help="Where to run, as SkyPilot's --infra: aws, gcp, k8s, slurm, aws/us-east-1..."),
    num_nodes: Optional[int] = typer.Option(None, "--num-nodes", help="Number of nodes."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the request the backend would receive (SkyPilot: the task YAML); launch nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Validate RECIPE and launch it: a SkyPilot managed job, or a local one (--backend local)."""
    from supervisor import launch
    from supervisor.launch import preflight
    from supervisor.recipes import build_spec

    spec = build_spec(recipe, sets=sets, name=name, infra=infra, num_nodes=num_nodes, spot=spot or None)
    preflight.check_scheme(spec.checkpoints_url)  # this machine reads the bucket: the launch event, status
    impl, request = launch.dryrun(spec, backend=backend)  # every check that needs no cloud, before asking anything
    if dry_run:
        typer.echo(request.render(), nl=False)
        return
    launch.require_secrets(request)  # input this shell lacks is named before any remote check
    for line in preflight.run(spec):  # the bucket and the Hub, before anything is provisioned
        typer.echo(f"{'preflight':>15}: {line}")
    if backend == "skypilot":
        from supervisor.launch.skypilot import summary

        for key, value in summary(spec, request.placement):
            typer.echo(f"{key:>15}: {value}")
        if not yes and not typer.confirm("Launch this managed job?", default=True):
            raise typer.Exit(1)
    job_id = launch.schedule(impl, request, spec)
    typer.echo(f"launched {backend} job {job_id} ({spec.name})")
    typer.echo(f"  watch:  supervise status {spec.name}    logs: supervise logs {spec.name} --follow")
    typer.echo(f"  stop:   supervise stop {spec.name}      (saves and commits a final checkpoint first)")


def _backend_of(name: str) -> str:
    """The backend of a job this machine launched. An unknown name is answered from the
    registry alone: asking SkyPilot would start its API server and jobs controller."""
    job = registry.lookup(name)
    if job is None:
        raise SuperviseError(f"no job named {name!r}; `supervise status` lists jobs", exit_code=1)
    return job.get("backend", "skypilot")


def _bucket_view(url: str | None, unreachable: set[str] | None = None) -> dict[str, Any]:
    """Latest committed step and its time (read-only listing), the restart streak
    (budget.streak_view of the nodes' restart record), and goodput so far.

    Read with the store's BRIEF policy: a bucket that cannot be reached costs one
    warning line and a few seconds, once per bucket (`unreachable`), not a minute per call."""
    view: dict[str, Any] = {"step": None, "checkpoint_time": None, "restarts": None, "goodput": None}
    unreachable = set() if unreachable is None else unreachable
    if not url or bucket_root(url) in unreachable:
        return view
    try:
        from supervisor.node.budget import RestartRecord, streak_view
        from supervisor.store import retry
        from supervisor.store.catalog import Catalog, StoreUnreachable

        catalog = Catalog(url, retry.BRIEF)
        committed = [s for s in catalog.list() if s.state == "committed"]
        if committed:
            top = max(committed, key=lambda s: s.step)
            view["step"] = top.step
            view["checkpoint_time"] = (top.manifest or {}).get("created")
        view["restarts"] = streak_view(RestartRecord(catalog.store).load(), view["step"])
    except ImportError:
        pass
    except StoreUnreachable as err:
        unreachable.add(bucket_root(url))
        typer.secho(f"warning: {err}; checkpoint and goodput columns left empty", fg="yellow", err=True)
        return view
    except (SuperviseError, OSError):
        pass
    view["goodput"] = _goodput(url)
    return view


def _streak(restarts: dict | None) -> str:
    """STREAK: failures without a new checkpoint in a row (preemptions never count)."""
    if not restarts:
        return "-"
    return f"{restarts['streak']} ({restarts['preemptions']} preempted)" if restarts["preemptions"] else str(restarts["streak"])


def _goodput(url: str) -> float | None:
    from supervisor.contract.layout import ledger_url

    try:  # a missing module is no goodput either
        from supervisor.ledger.merged import run_events
        from supervisor.ledger.timeline import summarize
        from supervisor.store import retry

        events, problems, _run = run_events(ledger_url(url), policy=retry.BRIEF)  # what report and auto read
        value = summarize(events, problems).get("goodput") if events else None
    except Exception:  # a status view must not fail on a partial or missing journal
        return None
    return float(value) if value is not None else None


def _collect(name: str | None) -> list[JobStatus]:
    if name is not None:
        backend = _backend_of(name)
        found = get_backend(backend).status(name)
        if not found:
            raise SuperviseError(f"{name!r} was launched here as a {backend} job, but {backend} no longer lists it; "
                                 "`supervise status` lists jobs", exit_code=1)
        return found
    jobs: list[JobStatus] = []
    backends = {j.get("backend", "skypilot") for j in registry.all_jobs()}
    for backend in sorted(backends | {"local"}):
        try:
            jobs += get_backend(backend).status(None)
        except ImportError:
            continue
        except SuperviseError as err:  # one backend down must not hide the other's jobs
            typer.secho(f"warning: {backend}: {err}", fg="yellow", err=True)
    return jobs


def status(
    name: Optional[str] = typer.Argument(None, help="Job name (default: all jobs of both backends)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of objects."),
) -> None:
    """State, recoveries, restart streak (failures without a new checkpoint; preemptions
    never count), latest committed step, last checkpoint time and goodput of jobs."""
    unreachable: set[str] = set()
    rows = [{**asdict(st), **_bucket_view(st.checkpoints_url, unreachable)} for st in _collect(name)]
    if as_json:
        typer.echo(json.dumps(rows, indent=1, default=str))
        return
    from rich.console import Console
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    heads = ("NAME", "BACKEND", "STATE", "RECOVERIES", "STREAK", "STEP", "LAST CHECKPOINT", "GOODPUT", "REASON")
    cells = [[r["name"], r["backend"], r["state"], str(r["recoveries"]), _streak(r["restarts"]),
              "-" if r["step"] is None else str(r["step"]), r["checkpoint_time"] or "-",
              f"{r['goodput']:.1%}" if r["goodput"] is not None else "-",
              shown_reason(r["reason"], r["details"], r["restarts"])] for r in rows]
    console, table = Console(), Table(*heads)
    for row in cells:
        table.add_row(*map(Text, row))  # a reason's "[H100:8]" is text, not markup
    if console.measure(table, options=console.options.update_width(10**6)).maximum <= console.width:
        console.print(table)
        return
    # narrower than the table (piped output is 80 columns): one block per job, nothing cut short
    for name, backend, state, *rest, reason in cells:
        facts = ", ".join(f"{h.lower()} {v}" for h, v in zip(heads[3:-1], rest)) + (f"\nreason: {reason}" if reason else "")
        console.print(Text(f"{name}  {backend} {state}"), Padding(Text(facts), (0, 0, 0, 2), expand=False))


def logs(
    name: str = typer.Argument(..., help="Job name."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming new output."),
) -> None:
    """Print the job's output."""
    get_backend(_backend_of(name)).logs(name, follow=follow)


def stop(
    name: str = typer.Argument(..., help="Job name."),
    now: bool = typer.Option(False, "--now", help="Hard cancel: no final checkpoint."),
    as_json: bool = typer.Option(False, "--json", help='Print {"name", "saved", "step", "reason"}.'),
) -> None:
    """Stop a job; by default the nodes save and commit a final checkpoint first, for as
    long as this run's measured saves need. Prints the step committed at the stop, or
    "not saved: <why>" and exits 1."""

    def say(obj: dict, text: str) -> None:
        typer.echo(json.dumps(obj) if as_json else text)

    try:
        result = get_backend(_backend_of(name)).cancel(name, graceful=not now)
    except AlreadyFinished as done:
        say({"name": name, "saved": None, "step": None, "reason": str(done)}, str(done))
        return
    if result is None:  # --now
        say({"name": name, "saved": False, "step": None, "reason": "--now: no final checkpoint"},
            f"stopped {name} (--now: no final checkpoint)")
        return
    say(result.as_json(), f"stopped {name}: {result.line()}")
    if not result.saved:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(start)
    app.command()(status)
    app.command()(logs)
    app.command()(stop)
