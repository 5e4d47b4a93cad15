"""`supervise node [options] -- <TorchTitan args>`: the command SkyPilot runs on every node.

Its options are contract.node.NodeOptions' fields (one Flag each, names, envvars
and help there) plus one `--<cloud>-metadata-url` per notices.SOURCES: a new
option or cloud needs no edit here."""

from __future__ import annotations

import inspect
import json
import sys

import typer

from supervisor.contract.node import METADATA_URL_SUFFIX, NodeOptions, flags
from supervisor.node.notices import CLOUDS, url_env

_KW = inspect.Parameter.KEYWORD_ONLY
_HELP = {"--cloud": f"Metadata service to poll for notices: auto, {', '.join(CLOUDS)}, none."}


def _url_param(cloud: str) -> str:
    return f"{cloud}_metadata_url"


def _with_options(command):
    """The command's signature, which typer reads: ctx, then every NodeOptions Flag and
    metadata URL, then the command's own switches (--dry-run, --json)."""
    sig = inspect.signature(command)
    ctx, *own = sig.parameters.values()
    opts = [inspect.Parameter(f.param, _KW, annotation=f.type, default=typer.Option(
                f.default, f.name, **{"help": _HELP.get(f.name), **f.typer})) for f in flags()]
    urls = [inspect.Parameter(_url_param(c), _KW, annotation=str,
                              default=typer.Option(None, f"--{c}{METADATA_URL_SUFFIX}", envvar=url_env(c),
                                                   help=f"Base URL of {c}'s metadata service (tests: a loopback fake)."))
            for c in CLOUDS]  # fmt: skip
    command.__signature__ = sig.replace(parameters=[ctx, *opts, *urls, *(p.replace(kind=_KW) for p in own if p.kind != p.VAR_KEYWORD)])
    return command


@_with_options
def node(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resume decision and the torchrun command; start nothing."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: one JSON object (command, resume_step, ...)."),
    **params,  # NodeOptions' flags and --<cloud>-metadata-url (_with_options)
) -> None:
    """Resume from the newest verified checkpoint, run torchrun, save on preemption notices.

    Exit codes: 0 finished, 75 preempted and saved, 69 retryable failure, 78 bad input
    or given up (restarts without progress).
    """
    from supervisor.errors import SuperviseError
    from supervisor.contract.exitcodes import ExitCode
    from supervisor.node.wrapper import make_plan, run

    if params["cloud"] not in (*CLOUDS, "auto", "none"):
        raise SuperviseError(f"--cloud {params['cloud']!r}: use auto, {', '.join(CLOUDS)} or none", ExitCode.USER_ERROR)
    urls = {c: url for c in CLOUDS if (url := params.pop(_url_param(c)))}
    opts = NodeOptions.from_params(params, metadata_urls=urls, trainer_args=tuple(ctx.args))
    if dry_run:
        plan = make_plan(opts, list(opts.trainer_args))
        if as_json:
            print(f"supervise node: {plan.describe()}", file=sys.stderr)
            typer.echo(json.dumps(plan.as_json()))
        else:
            import shlex

            typer.echo(plan.describe())
            typer.echo(shlex.join(plan.command))
        return
    raise typer.Exit(run(opts, list(opts.trainer_args)))
