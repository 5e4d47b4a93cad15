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

import ast
import importlib.util
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.errors import SuperviseError
from supervisor.exitcodes import ExitCode

# (flag, takes a value) that the wrapper owns; user values are replaced.
_OWNED = {
    "--checkpoint.enable": False,
    "--checkpoint.no-enable": False,
    "--checkpoint.no_enable": False,
    "--checkpoint.folder": True,
    "--checkpoint.keep_latest_k": True,
    "--checkpoint.keep-latest-k": True,
    "--checkpoint.load_step": True,
    "--checkpoint.load-step": True,
}
_DUMP_FLAGS = ("--dump_folder", "--dump-folder", "--job.dump_folder")
_BOOL_WORDS = {"true", "false"}


def _is_remote(path: str) -> bool:
    return "://" in path


def _split(arg: str) -> tuple[str, str | None]:
    """`--a.b=c` -> ("--a.b", "c"); `--a.b` -> ("--a.b", None)."""
    if arg.startswith("--") and "=" in arg:
        key, value = arg.split("=", 1)
        return key, value
    return arg, None


def arg_value(args: list[str], *names: str) -> str | None:
    """The last value given for any of `names` (both `--k v` and `--k=v`)."""
    found = None
    for i, arg in enumerate(args):
        key, value = _split(arg)
        if key in names:
            if value is not None:
                found = value
            elif i + 1 < len(args):
                found = args[i + 1]
    return found


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


def ledger_url(checkpoints: str) -> str:
    return checkpoints.rstrip("/") + "/_ledger"


def rewrite_trainer_args(trainer_args: list[str], url: str, resume_step: int | None) -> list[str]:
    """User args minus the checkpoint flags the wrapper owns, plus ours.
    `--job.dump_folder` (pre-0.3 spelling) becomes TorchTitan 0.3's `--dump_folder`."""
    out: list[str] = []
    i = 0
    while i < len(trainer_args):
        key, value = _split(trainer_args[i])
        nxt = trainer_args[i + 1] if i + 1 < len(trainer_args) else None
        if key in _OWNED:
            takes_value = _OWNED[key] or (nxt is not None and nxt.lower() in _BOOL_WORDS)
            i += 1 if (value is not None or not takes_value) else 2
            continue
        if key == "--job.dump_folder":
            out.append("--dump_folder" if value is None else f"--dump_folder={value}")
        else:
            out.append(trainer_args[i])
        i += 1
    out += ["--checkpoint.enable", "--checkpoint.folder", url, "--checkpoint.keep_latest_k", "0"]
    if resume_step is not None:
        out += ["--checkpoint.load_step", str(resume_step)]
    return out


def _config_functions(module_name: str) -> set[str] | None:
    """Top-level function names of TorchTitan's config_registry for `module_name`,
    read from source (importing it costs seconds and needs triton); None when the
    source cannot be found that way (then TorchTitan itself will judge)."""
    candidates = []
    try:
        from torchtitan.experiments import _supported_experiments
        from torchtitan.models import _supported_models
    except ImportError:
        return None
    if module_name in _supported_models | _supported_experiments:
        root = Path(importlib.util.find_spec("torchtitan").origin).parent
        for sub in ("models", "experiments", "experiments/rl/examples"):
            candidates.append(root / sub / module_name.replace(".", "/") / "config_registry.py")
        found = next((p for p in candidates if p.is_file()), None)
    else:
        found = None
        for name in (f"{module_name}.config_registry", module_name):
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            if spec and spec.origin and spec.origin.endswith(".py"):
                found = Path(spec.origin)
                break
        if found is None:
            raise SuperviseError(
                f"unknown TorchTitan module {module_name!r}: not one of TorchTitan's models "
                f"({', '.join(sorted(_supported_models))}) and not an importable module",
                ExitCode.USER_ERROR,
            )
    if found is None:
        return None
    tree = ast.parse(found.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)} | {
        t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
    }


def validate_trainer_args(trainer_args: list[str]) -> None:
    """Cheap checks that catch what would otherwise crash every restart."""
    if not trainer_args:
        raise SuperviseError(
            "no trainer arguments: use `supervise node [options] -- --module llama3 --config llama3_debugmodel ...`",
            ExitCode.USER_ERROR,
        )
    module = arg_value(trainer_args, "--module")
    config = arg_value(trainer_args, "--config")
    if not module or not config:
        raise SuperviseError(
            "TorchTitan needs --module and --config (e.g. `-- --module llama3 --config llama3_debugmodel`)",
            ExitCode.USER_ERROR,
        )
    functions = _config_functions(module)
    if functions is not None and config not in functions:
        public = sorted(f for f in functions if not f.startswith("_") and f[0].islower())
        raise SuperviseError(
            f"unknown TorchTitan config {config!r} for module {module!r}; available: {', '.join(public)}",
            ExitCode.USER_ERROR,
        )


@dataclass
class ResumePlan:
    """The decision for one start: which verified step (None = fresh) and why."""

    checkpoints: str
    step: int | None
    reason: str
    skipped: list[tuple[int, str]] = field(default_factory=list)


def decide(checkpoints: str) -> ResumePlan:
    """Ask the catalog for the newest verified step (it quarantines failing ones).
    A store that cannot be reached at start is a configuration error: a wrong
    endpoint, bucket or credentials will not fix itself, and retrying would loop."""
    from supervisor.store.catalog import Catalog

    try:
        latest = Catalog(checkpoints).latest()
    except SuperviseError as err:
        raise SuperviseError(f"checkpoint store {checkpoints} is unreachable: {err}", ExitCode.USER_ERROR) from err
    except (OSError, ValueError) as err:
        raise SuperviseError(
            f"checkpoint store {checkpoints} is unreachable: {type(err).__name__}: {err}", ExitCode.USER_ERROR
        ) from err
    return ResumePlan(
        checkpoints=checkpoints,
        step=latest.step,
        reason=latest.describe(),
        skipped=[(int(s), str(r)) for s, r in (latest.skipped or [])],
    )
