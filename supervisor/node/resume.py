"""What a (re)start resumes from, and the TorchTitan arguments that make it so.

TorchTitan 0.3.0 facts this relies on (torchtitan/components/checkpointer):
- the checkpoint folder is `join(dump_folder, checkpoint.folder)`, where an
  absolute path or a remote URI in `checkpoint.folder` replaces `dump_folder`;
- with `load_step -1` and an existing folder it loads the highest `step-N` that
  has a `.metadata` file -- its own guess, with no completeness check. So the
  wrapper always names the step (`--checkpoint.load_step N`) when the catalog has
  a verified one, and sets SUPERVISE_RESUME_STEP so the trainer can refuse to
  guess on a fresh start;
- `keep_latest_k 0` turns TorchTitan's own retention off (it counts foreign
  folders and deletes good checkpoints); retention is the catalog's.
"""

from __future__ import annotations

import os
import posixpath
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from supervisor.errors import SuperviseError
from supervisor.contract.exitcodes import ExitCode
from supervisor.titan_config import arg_value, model_problem, split_flag, strip_node_owned

if TYPE_CHECKING:
    from supervisor.store.catalog import Catalog

_DUMP_FLAGS = ("--dump_folder", "--dump-folder", "--job.dump_folder")


def _is_remote(path: str) -> bool:
    return "://" in path


def checkpoint_url(trainer_args: list[str], checkpoints: str | None, cwd: str | None = None) -> str:
    """The run's checkpoint folder: `--checkpoints`, else TorchTitan's own
    `dump_folder` + `checkpoint.folder` (same join rule and defaults as TorchTitan).
    Local paths come back absolute, so TorchTitan cannot re-root them."""
    cwd = cwd or os.getcwd()
    if checkpoints:
        url = checkpoints
    else:
        dump = arg_value(trainer_args, *_DUMP_FLAGS) or "./outputs"
        folder = arg_value(trainer_args, "--checkpoint.folder") or "checkpoint"
        if _is_remote(folder) or os.path.isabs(folder):
            url = folder
        elif _is_remote(dump):
            url = posixpath.join(dump, folder)
        else:
            url = os.path.join(dump, folder)
    if _is_remote(url):
        return url.rstrip("/")
    if url.startswith("file://"):
        url = url[len("file://") :]
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(url)))


def rewrite_trainer_args(trainer_args: list[str], url: str, resume_step: int | None) -> list[str]:
    """User args minus the checkpoint flags the wrapper owns (titan_config.OWNED), plus ours.
    `--job.dump_folder` (pre-0.3 spelling) becomes TorchTitan 0.3's `--dump_folder`."""
    out: list[str] = []
    for arg in strip_node_owned(trainer_args):
        key, value = split_flag(arg)
        if key == "--job.dump_folder":
            out.append("--dump_folder" if value is None else f"--dump_folder={value}")
        else:
            out.append(arg)
    out += ["--checkpoint.enable", "--checkpoint.folder", url, "--checkpoint.keep_latest_k", "0"]
    if resume_step is not None:
        out += ["--checkpoint.load_step", str(resume_step)]
    return out


def validate_trainer_args(trainer_args: list[str]) -> None:
    """The cheap checks (no torch): args present, --module/--config known to TorchTitan.
    TorchTitan's own parser runs beside torchrun (see wrapper.run)."""
    if not trainer_args:
        raise SuperviseError(
            "no trainer arguments: use `supervise node [options] -- --module llama3 --config llama3_debugmodel ...`",
            ExitCode.USER_ERROR,
        )
    problem = model_problem(arg_value(trainer_args, "--module"), arg_value(trainer_args, "--config"))
    if problem:
        raise SuperviseError(problem, ExitCode.USER_ERROR)


@dataclass
class ResumePlan:
    """The decision for one start: which verified step (None = fresh) and why."""

    checkpoints: str
    step: int | None
    reason: str
    skipped: list[tuple[int, str]] = field(default_factory=list)


@contextmanager
def store_errors(checkpoints: str):
    """Store trouble at start -> the exit code it deserves.

    A store that kept failing with transient errors past the retry policy's
    bounded wait is retryable (69: an outage is not a config error; the
    progress budget bounds a loop). A store that answers "no such bucket",
    "access denied" or another definite refusal is a configuration error (78).
    """
    from supervisor.store import retry
    from supervisor.store.errors import StoreUnreachable

    try:
        yield
    except StoreUnreachable as err:
        raise SuperviseError(f"checkpoint store {checkpoints} is unreachable: {err}", ExitCode.RETRYABLE) from err
    except SuperviseError as err:
        raise SuperviseError(f"checkpoint store {checkpoints} refused: {err}", ExitCode.USER_ERROR) from err
    except (OSError, ValueError) as err:
        code = ExitCode.RETRYABLE if retry.is_transient(err) else ExitCode.USER_ERROR
        raise SuperviseError(f"checkpoint store {checkpoints}: {type(err).__name__}: {err}", code) from err


def decide(catalog: Catalog) -> ResumePlan:
    """Ask the catalog for the newest verified step (it quarantines failing ones)."""
    with store_errors(catalog.url):
        latest = catalog.latest()
    return ResumePlan(
        checkpoints=catalog.url,
        step=latest.step,
        reason=latest.describe(),
        skipped=[(int(s), str(r)) for s, r in (latest.skipped or [])],
    )
