"""`supervise node`'s options as one typed value, the only owner of the node command.

The launcher renders a `NodeOptions` (`to_argv`), backends derive theirs with
`dataclasses.replace`, the node parses it back (`from_argv`) and node/cli.py
builds its typer command from the same fields' `Flag`s: a new option is one field.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from typing import Any

METADATA_URL_SUFFIX = "-metadata-url"  # --<cloud>-metadata-url, one per notices.SOURCES (node/cli.py)
DEFAULT_MASTER_PORT = 8008  # the port SkyPilot's TorchTitan example uses
DEFAULT_TRAINER_MODULE = "supervisor.titan.train"
DEFAULT_MAX_RESTARTS_WITHOUT_PROGRESS = 3


@dataclass(frozen=True)
class Direct:
    """TorchTitan writes straight through the bucket's API: a commit waits for nothing."""


@dataclass(frozen=True)
class Mount:
    """TorchTitan writes to the bucket mounted at `path`; a commit waits at least
    `commit_wait_s` (None: runtime.DEFAULT_COMMIT_WAIT_S) for the upload to land."""

    path: str
    commit_wait_s: float | None = None


@dataclass(frozen=True)
class Auto:
    """checkpoint.interval auto: the wrapper picks Young/Daly from the ledger, in [low, high] steps."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> Auto:
        low, _, high = text.partition(":")
        if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
            from supervisor.errors import SuperviseError
            from supervisor.contract.exitcodes import ExitCode

            raise SuperviseError(f"--checkpoint-interval-auto {text!r}: use LOW:HIGH steps with 1 <= LOW <= HIGH, "
                                 "e.g. 50:5000", ExitCode.USER_ERROR)
        return cls(int(low), int(high))


@dataclass(frozen=True)
class Flag:
    """One command-line option: its name, value type, default and typer's keywords (help, envvar, ...)."""

    name: str
    type: type
    default: Any = None
    param: str = ""  # the CLI parameter; "" = the field's name
    always: bool = False  # rendered even at its default (the no-progress bound is always explicit)
    typer: dict = field(default_factory=dict)


def _opt(name: str, type_: type, default: Any = None, *, always: bool = False, **typer_kw):
    return field(default=default, metadata={"flags": (Flag(name, type_, default, always=always, typer=typer_kw),)})


_MOUNT = Flag("--checkpoint-mount", str, param="checkpoint_mount", typer={"metavar": "PATH", "help":
              "Where TorchTitan writes when the bucket is mounted; the catalog still reads --checkpoints."})
_WAIT = Flag("--commit-wait", float, param="commit_wait", typer={"help":
             "Seconds a commit waits at least for a mount's upload to land (default: the recipe's checkpoint.commit_wait_s, "
             "600); it waits 3 x this run's average commit when that is longer, and the wait starts again while objects land."})
_AUTO = Flag("--checkpoint-interval-auto", str, param="checkpoint_interval_auto", typer={"metavar": "LOW:HIGH", "help":
             "checkpoint.interval auto: pass TorchTitan the Young/Daly interval from the run's ledger, "
             "clamped to LOW..HIGH steps (docs/ledger.md)."})
_GRACE_HELP = ("After a notice without deadline (SIGTERM, SIGINT, a notice file without one, `supervise stop`): "
               "the least wait for the save. The wait is 3 x the longest save + commit in the run ledger + 60 s, at "
               "least this; before any save was measured, --hang-timeout; each new save or commit event starts it again.")


@dataclass(frozen=True)
class NodeOptions:
    """Everything `supervise node` takes, in the order it is rendered, plus the trainer's args."""

    checkpoints: str | None = _opt("--checkpoints", str, envvar="SUPERVISE_CHECKPOINTS", metavar="URL", help=(
        "Checkpoint URL (s3://..., gs://..., or a path); default: TorchTitan's --dump_folder + --checkpoint.folder."))
    max_restarts_without_progress: int = _opt(
        "--max-restarts-without-progress", int, DEFAULT_MAX_RESTARTS_WITHOUT_PROGRESS, always=True, min=0, metavar="K",
        help="Exit 78 at a start that follows K incarnations in a row that failed (69) on a healthy cluster "
        "without a new committed checkpoint; preemptions never count (0: never give up).")
    write: Direct | Mount = field(default=Direct(), metadata={"flags": (_MOUNT, _WAIT)})
    keep: int = _opt("--keep", int, 0, min=0,
                     help="Committed checkpoints kept during the run (older ones pruned after each commit; 0 = all).")
    interval: Auto | None = field(default=None, metadata={"flags": (_AUTO,)})  # None: the trainer args decide
    nproc_per_node: int | None = _opt(
        "--nproc-per-node", int, help="Ranks on this node (default: SKYPILOT_NUM_GPUS_PER_NODE, local GPUs, or 1 on CPU).")
    master_port: int = _opt("--master-port", int, DEFAULT_MASTER_PORT, envvar="SUPERVISE_MASTER_PORT")
    trainer_module: str = _opt("--trainer-module", str, DEFAULT_TRAINER_MODULE, help="Python module torchrun runs.")
    run_dir: str | None = _opt("--run-dir", str, help="Node-local folder shared with the ranks (default: a fresh temp folder).")
    notice_file: str | None = _opt("--notice-file", str, envvar="SUPERVISE_NOTICE_FILE",
                                   help="A file whose appearance is a preemption notice.")
    cloud: str = _opt("--cloud", str, "auto")  # help names notices.SOURCES (node/cli.py)
    notice_poll_s: float = _opt("--notice-poll", float, 5.0, help="Seconds between metadata polls.")
    grace_s: float = _opt("--grace", float, 300.0, help=_GRACE_HELP)
    hang_timeout_s: float = _opt("--hang-timeout", float, 1800.0, help="Seconds without any rank advancing = hang.")
    startup_timeout_s: float = _opt("--startup-timeout", float, 1800.0, help="Seconds allowed before the first heartbeat.")
    metadata_urls: dict[str, str] = field(default_factory=dict)  # cloud -> URL: --<cloud>-metadata-url
    program: tuple[str, ...] = ("supervise",)  # what runs `node` (a backend may resolve it)
    trainer_args: tuple[str, ...] = ()  # TorchTitan's, after `--`

    def params(self) -> dict[str, Any]:
        """The CLI parameters (Flag.param -> value) that give these options."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if [x.param for x in f.metadata.get("flags", ())] == [""]}
        mount = self.write if isinstance(self.write, Mount) else None
        auto = self.interval
        return {**out, "checkpoint_mount": mount and mount.path, "commit_wait": mount and mount.commit_wait_s,
                "checkpoint_interval_auto": auto and f"{auto.low}:{auto.high}"}

    @classmethod
    def from_params(cls, params: dict[str, Any], **rest: Any) -> NodeOptions:
        """The inverse of params(); `rest`: metadata_urls, program, trainer_args."""
        p = dict(params)
        mount, wait, auto = p.pop("checkpoint_mount", None), p.pop("commit_wait", None), p.pop("checkpoint_interval_auto", None)
        return cls(**p, write=Mount(mount, wait) if mount else Direct(), interval=Auto.parse(auto) if auto else None, **rest)

    def to_argv(self) -> list[str]:
        """The node command: options that differ from their default, in field order."""
        argv, params = [*self.program, "node"], self.params()
        for flag in flags():
            value = params[flag.param]
            if value is not None and (flag.always or value != flag.default):
                argv += [flag.name, _text(value)]
        for cloud, url in self.metadata_urls.items():
            argv += [f"--{cloud}{METADATA_URL_SUFFIX}", url]
        return [*argv, "--", *self.trainer_args]

    @classmethod
    def from_argv(cls, argv: list[str]) -> NodeOptions:
        """Read back what to_argv() wrote (`--flag value` or `--flag=value`)."""
        program = tuple(itertools.takewhile(lambda a: a != "node", argv))
        tokens = list(argv[len(program) + 1 :])
        by_name = {f.name: f for f in flags()}
        params, urls = {}, {}
        while tokens and tokens[0] != "--":
            name, eq, value = tokens.pop(0).partition("=")
            value = value if eq else tokens.pop(0) if tokens else None
            if value is None or not (name in by_name or name.endswith(METADATA_URL_SUFFIX)):
                raise ValueError(f"node command {argv}: {name!r} is not a `supervise node` option with a value")
            if name in by_name:
                params[by_name[name].param] = by_name[name].type(value)
            else:
                urls[name[2 : -len(METADATA_URL_SUFFIX)]] = value
        defaults = {f.param: f.default for f in flags()}
        return cls.from_params({**defaults, **params}, metadata_urls=urls, program=program, trainer_args=tuple(tokens[1:]))


def flags() -> list[Flag]:
    """Every Flag of NodeOptions in rendering order, each with its CLI parameter name."""
    from dataclasses import replace

    return [replace(flag, param=flag.param or f.name) for f in fields(NodeOptions) for flag in f.metadata.get("flags", ())]


def _text(value: Any) -> str:
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)
