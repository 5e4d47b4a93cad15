"""The `supervise` command: one Typer app composed from each package's commands.

Every command raises `SuperviseError` for problems the user can fix; `main`
turns it into one line on stderr and the error's exit code (a traceback only
with `--debug`).
"""

from __future__ import annotations

import os
import sys

import typer

from supervisor import __version__
from supervisor.errors import SuperviseError

app = typer.Typer(name="supervise", help="Keep long TorchTitan training runs alive on spot capacity.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"supervise {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if debug:
        os.environ["SUPERVISE_DEBUG"] = "1"


def _register() -> None:
    """Attach each package's commands. Packages import nothing from here."""
    from supervisor.demo import demo_command
    from supervisor.drill import drill_command
    from supervisor.launch.cli import register as register_launch
    from supervisor.ledger.report import report_command
    from supervisor.node.cli import node
    from supervisor.store.cli import app as checkpoints_app

    register_launch(app)  # start, status, logs, stop
    app.command("report")(report_command)
    app.command("demo")(demo_command)
    app.command("drill")(drill_command)
    app.command("node", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(node)
    app.add_typer(checkpoints_app, name="checkpoints", help="Inspect and manage the verified checkpoint catalog.")


_register()


def main() -> None:
    debug = "--debug" in sys.argv or os.environ.get("SUPERVISE_DEBUG") == "1"
    try:
        app()
    except SuperviseError as err:
        if debug:
            raise
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(err.exit_code)
