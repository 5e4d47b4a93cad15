"""`supervise checkpoints list|latest|verify|commit|copy|prune URL`.

Exit codes: 0 ok, 1 nothing valid / verification failed, 2 usage or input
error. Errors are SuperviseError (one line, printed by supervisor.cli.main).
"""

from __future__ import annotations

import json

import typer

from supervisor.contract import layout
from supervisor.store.errors import CheckpointInvalid, StoreInputError

app = typer.Typer(no_args_is_help=True)

URL = typer.Argument(..., help="Folder that holds the step-N folders, e.g. s3://bucket/run1/checkpoint")


def _catalog(url: str, brief: bool = False):
    """brief: a view at a terminal gives up on an unreachable store in seconds (retry.BRIEF);
    writes and byte-reading checks keep the patient policy."""
    from supervisor.store import retry
    from supervisor.store.catalog import Catalog

    return Catalog(url, retry.BRIEF if brief else retry.PATIENT)


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=None))


def _table(title: str, columns, rows) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


_STYLE = {"committed": "green", "legacy": "cyan", "incomplete": "yellow", "corrupt": "red", "quarantined": "magenta"}


@app.command("list")
def list_(url: str = URL, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Every step-N folder with its state (committed, legacy, incomplete, corrupt, quarantined)."""
    infos = _catalog(url, brief=True).list()
    if as_json:
        _print_json([i.to_json() for i in infos])
        return
    if not infos:
        typer.echo(f"no step-N folders under {url}")
        return
    rows = [(str(i.step), f"[{_STYLE.get(i.state, '')}]{i.state}[/]", (i.manifest or {}).get("created", "") or "",
             i.reason) for i in infos]
    _table(url, ("step", "state", "committed at", "reason"), rows)


@app.command()
def latest(
    url: str = URL,
    deep: bool = typer.Option(False, "--deep", help="Re-read and re-hash every object."),
    as_json: bool = typer.Option(False, "--json", help='Print {"step": N, "path": ..., "state": ...} or {"step": null}.'),
) -> None:
    """The newest checkpoint that verifies (falling back past bad ones, which are quarantined)."""
    result = _catalog(url, brief=not deep).latest(deep=deep)
    if as_json:
        _print_json(result.to_json())
        if result.skipped:
            typer.echo(result.describe(), err=True)
    else:
        typer.echo(result.describe())
        if result.path:
            typer.echo(result.path)
    if result.step is None:
        raise typer.Exit(1)


@app.command()
def verify(
    url: str = URL,
    step: int = typer.Option(None, "--step", help="Step to verify (default: the newest step-N folder)."),
    deep: bool = typer.Option(False, "--deep", help="Re-read and re-hash every object, not just sizes/ETags."),
) -> None:
    """Check one checkpoint against its manifest (or, without one, against `.metadata`)."""
    catalog = _catalog(url, brief=not deep)
    if step is None:
        steps = catalog.steps()
        if not steps:
            raise CheckpointInvalid(f"no step-N folders under {url}")
        step = steps[-1]
    info = catalog.verify(step, deep=deep)
    if not info.ok:
        raise CheckpointInvalid(f"step {step} {info.state}: {info.reason}")
    kind = "deep" if deep else "sizes/ETags"
    typer.echo(f"step {step} {info.state}: verified ({kind})" + (f"; {info.reason}" if info.state == "legacy" else ""))


@app.command()
def commit(
    url: str = URL,
    step: int = typer.Option(..., "--step", help="Step to commit."),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for objects that are not visible yet."),
) -> None:
    """Write step-N/_COMMIT.json once every file `.metadata` names is complete (one writer wins)."""
    manifest = _catalog(url).commit(step, wait_s=wait)
    total = sum(o["size"] for o in manifest["objects"].values())
    typer.echo(f"committed step {step}: {len(manifest['objects'])} objects, {total} bytes")


@app.command()
def copy(
    src: str = typer.Argument(..., help="Catalog to copy from, e.g. s3://bucket/run1/checkpoint"),
    dst: str = typer.Argument(..., help="Catalog to copy to (another prefix, bucket or store)"),
    step: list[int] = typer.Option([], "--step", help="Step to copy (repeatable; default: every committed step)."),
) -> None:
    """Copy committed steps with their manifests; each is deep-verified at DST before it is committed there."""
    from supervisor.store.catalog import Catalog

    copied = _catalog(src).copy_to(Catalog(dst), steps=list(step) or None)
    if not copied:
        raise CheckpointInvalid(f"no committed step to copy under {src}")
    typer.echo(f"copied and verified: {', '.join(f'step-{s}' for s in copied)} -> {dst}")


@app.command()
def prune(
    url: str = URL,
    keep: int = typer.Option(..., "--keep", help="Committed checkpoints to keep (the newest verified one always stays)."),
    pin: list[int] = typer.Option([], "--pin", help="Step to keep regardless (repeatable)."),
    yes: bool = typer.Option(False, "--yes", help="Really delete (default: dry run)."),
) -> None:
    """Delete old committed checkpoints; never the newest verified one, never unknown folders."""
    if keep < 0:
        raise StoreInputError("--keep must be >= 0")
    result = _catalog(url).prune(keep, pinned=pin, dry_run=not yes)
    typer.echo(result.reason)
    if result.anchor is None:
        raise typer.Exit(1)
    verb = "deleted" if yes else "would delete"
    typer.echo(f"{verb}: " + (", ".join(map(layout.step_dir, result.delete)) or "nothing"))
    if not yes and result.delete:
        typer.echo("dry run: pass --yes to delete")
