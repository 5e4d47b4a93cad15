"""`supervise node [options] -- <TorchTitan args>`: the command SkyPilot runs on every node."""

from __future__ import annotations

import inspect
import json
import sys

import typer

from supervisor.node.budget import DEFAULT_MAX_RESTARTS_WITHOUT_PROGRESS
from supervisor.node.notices import CLOUDS, url_env
from supervisor.node.torchrun import DEFAULT_MASTER_PORT, DEFAULT_TRAINER_MODULE
from supervisor.runtime import ENV_CHECKPOINTS


def _url_param(cloud: str) -> str:
    return f"{cloud}_metadata_url"


def _metadata_url_options(command):
    """One `--<cloud>-metadata-url` option (and SUPERVISE_<CLOUD>_METADATA_URL) per
    cloud of notices.SOURCES, added to the command's signature, which typer reads:
    a new cloud needs no edit here."""
    sig = inspect.signature(command)
    fixed = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    urls = [inspect.Parameter(_url_param(c), inspect.Parameter.KEYWORD_ONLY, annotation=str,
                              default=typer.Option(None, f"--{c}-metadata-url", envvar=url_env(c),
                                                   help=f"Base URL of {c}'s metadata service (tests: a loopback fake)."))
            for c in CLOUDS]  # fmt: skip
    command.__signature__ = sig.replace(parameters=[*fixed, *urls])
    return command


@_metadata_url_options
def node(
    ctx: typer.Context,
    checkpoints: str = typer.Option(
        None, "--checkpoints", envvar=ENV_CHECKPOINTS, metavar="URL",
        help="Checkpoint URL (s3://..., gs://..., or a path); default: TorchTitan's --dump_folder + --checkpoint.folder.",
    ),
    checkpoint_mount: str = typer.Option(
        None, "--checkpoint-mount", metavar="PATH",
        help="Where TorchTitan writes when the bucket is mounted; the catalog still reads --checkpoints.",
    ),
    commit_wait: float = typer.Option(
        None, "--commit-wait",
        help="Seconds a commit waits at least for a mount's upload to land (default: the recipe's checkpoint.commit_wait_s, 600); it waits "
        "3 x this run's average commit when that is longer, and the wait starts again while objects land.",
    ),
    keep: int = typer.Option(
        0, "--keep", min=0, help="Committed checkpoints kept during the run (older ones pruned after each commit; 0 = all)."
    ),
    nproc_per_node: int = typer.Option(
        None, "--nproc-per-node", help="Ranks on this node (default: SKYPILOT_NUM_GPUS_PER_NODE, local GPUs, or 1 on CPU)."
    ),
    master_port: int = typer.Option(DEFAULT_MASTER_PORT, "--master-port", envvar="SUPERVISE_MASTER_PORT"),
    trainer_module: str = typer.Option(DEFAULT_TRAINER_MODULE, "--trainer-module", help="Python module torchrun runs."),
    run_dir: str = typer.Option(None, "--run-dir", help="Node-local folder shared with the ranks (default: a fresh temp folder)."),
    notice_file: str = typer.Option(
        None, "--notice-file", envvar="SUPERVISE_NOTICE_FILE", help="A file whose appearance is a preemption notice."
    ),
    cloud: str = typer.Option("auto", "--cloud", help=f"Metadata service to poll for notices: auto, {', '.join(CLOUDS)}, none."),
    notice_poll: float = typer.Option(5.0, "--notice-poll", help="Seconds between metadata polls."),
    grace: float = typer.Option(
        300.0, "--grace",
        help="After a notice without deadline (SIGTERM, SIGINT, a notice file without one, `supervise stop`): "
        "the least wait for the save. The wait is 3 x the longest save + commit in the run ledger + 60 s, at "
        "least this; before any save was measured, --hang-timeout; each new save or commit event starts it again.",
    ),
    hang_timeout: float = typer.Option(1800.0, "--hang-timeout", help="Seconds without any rank advancing = hang."),
    startup_timeout: float = typer.Option(1800.0, "--startup-timeout", help="Seconds allowed before the first heartbeat."),
    max_restarts_without_progress: int = typer.Option(
        DEFAULT_MAX_RESTARTS_WITHOUT_PROGRESS, "--max-restarts-without-progress", min=0, metavar="K",
        help="Exit 78 at a start that follows K incarnations in a row that failed (69) on a healthy cluster "
        "without a new committed checkpoint; preemptions never count (0: never give up).",
    ),
    checkpoint_interval_auto: str = typer.Option(
        None, "--checkpoint-interval-auto", metavar="LOW:HIGH",
        help="checkpoint.interval auto: pass TorchTitan the Young/Daly interval from the run's ledger, "
        "clamped to LOW..HIGH steps (docs/ledger.md).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resume decision and the torchrun command; start nothing."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: one JSON object (command, resume_step, ...)."),
    **metadata_urls: str | None,  # --<cloud>-metadata-url, one per notices.SOURCES (_metadata_url_options)
) -> None:
    """Resume from the newest verified checkpoint, run torchrun, save on preemption notices.

    Exit codes: 0 finished, 75 preempted and saved, 69 retryable failure, 78 bad input
    or given up (restarts without progress).
    """
    from supervisor.errors import SuperviseError
    from supervisor.exitcodes import ExitCode
    from supervisor.node.wrapper import NodeOptions, make_plan, run

    if cloud not in (*CLOUDS, "auto", "none"):
        raise SuperviseError(f"--cloud {cloud!r}: use auto, {', '.join(CLOUDS)} or none", ExitCode.USER_ERROR)
    opts = NodeOptions(
        checkpoints=checkpoints, checkpoint_mount=checkpoint_mount, commit_wait_s=commit_wait, keep=keep,
        nproc_per_node=nproc_per_node, master_port=master_port, trainer_module=trainer_module, run_dir=run_dir,
        notice_file=notice_file, cloud=cloud,
        metadata_urls={c: metadata_urls.get(_url_param(c)) for c in CLOUDS},
        notice_poll_s=notice_poll, grace_s=grace, hang_timeout_s=hang_timeout, startup_timeout_s=startup_timeout,
        max_restarts_without_progress=max_restarts_without_progress,
        interval_auto=_interval_range(checkpoint_interval_auto),
    )  # fmt: skip
    trainer_args = list(ctx.args)
    if dry_run:
        plan = make_plan(opts, trainer_args)
        if as_json:
            print(f"supervise node: {plan.describe()}", file=sys.stderr)
            typer.echo(json.dumps(plan.as_json()))
        else:
            import shlex

            typer.echo(plan.describe())
            typer.echo(shlex.join(plan.command))
        return
    raise typer.Exit(run(opts, trainer_args))


def _interval_range(text: str | None) -> tuple[int, int] | None:
    """`--checkpoint-interval-auto LOW:HIGH` -> (low, high); a bad value is a config error (78)."""
    if text is None:
        return None
    low, _, high = text.partition(":")
    if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
        from supervisor.errors import SuperviseError
        from supervisor.exitcodes import ExitCode

        raise SuperviseError(f"--checkpoint-interval-auto {text!r}: use LOW:HIGH steps with 1 <= LOW <= HIGH, "
                             "e.g. 50:5000", ExitCode.USER_ERROR)
    return int(low), int(high)
