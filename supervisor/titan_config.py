"""TorchTitan's config, as recipe validation (spec.py) and the node wrapper both read it,
one copy each: `OWNED`, the flags supervise sets itself; `registry_file` /
`titan_configs`, the `--module`'s config_registry.py found the way TorchTitan 0.3.0's
`ConfigManager._load_config` (torchtitan/config/manager.py) imports it, but read from
source (importing it pulls torch and the model code: seconds, and triton on CPU); and
`check_args`, TorchTitan's own parser in a child process that imports TorchTitan once.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import importlib.util
import io
import json
import os
import re
import selectors
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class Owned:
    by: str  # "node": the wrapper rewrites it on every start; "recipe": a recipe field renders it
    takes_value: bool
    why: str


# TorchTitan keys (section.key, underscores) that supervise sets.
OWNED: dict[str, Owned] = {
    "checkpoint.enable": Owned("node", False, "it is always on under supervise"),
    "checkpoint.folder": Owned("node", True, "set checkpoint.bucket instead"),
    "checkpoint.load_step": Owned("node", True, "the node wrapper picks the newest committed step"),
    "checkpoint.keep_latest_k": Owned("node", True, "retention is supervise's (supervise checkpoints prune)"),
    "checkpoint.interval": Owned("recipe", True, "set checkpoint.interval instead"),
    "dump_folder": Owned("recipe", True, "checkpoints go to checkpoint.bucket"),
    "job.dump_folder": Owned("recipe", True, "checkpoints go to checkpoint.bucket"),
    "dataloader.dataset": Owned("recipe", True, "set dataset.name instead"),
    "dataloader.dataset_path": Owned("recipe", True, "set dataset.path instead"),
    "hf_assets_path": Owned("recipe", True, "set tokenizer.path instead"),
    "module": Owned("recipe", True, "set model.module instead"),
    "config": Owned("recipe", True, "set model.config instead"),
}
PARALLEL_DEGREES = (
    "data_parallel_replicate_degree",
    "data_parallel_shard_degree",
    "tensor_parallel_degree",
    "pipeline_parallel_degree",
    "context_parallel_degree",
)
_BOOL_WORDS = {"true", "false"}


def split_flag(arg: str) -> tuple[str, str | None]:
    """`--a.b=c` -> ("--a.b", "c"); `--a.b` -> ("--a.b", None)."""
    if arg.startswith("--") and "=" in arg:
        key, value = arg.split("=", 1)
        return key, value
    return arg, None


def owned_key(flag: str) -> str | None:
    """The OWNED key a flag sets (`--checkpoint.keep-latest-k`, `--checkpoint.no-enable`
    and tyro's other spellings included), or None."""
    if not flag.startswith("--"):
        return None
    key = split_flag(flag)[0][2:].replace("-", "_")
    if key in OWNED:
        return key
    section, _, leaf = key.rpartition(".")
    if leaf.startswith("no_"):
        positive = f"{section + '.' if section else ''}{leaf[3:]}"
        if positive in OWNED and not OWNED[positive].takes_value:
            return positive
    return None


def strip_node_owned(args: list[str]) -> list[str]:
    """`args` without the flags (and their values) that the node wrapper sets itself."""
    out: list[str] = []
    i = 0
    while i < len(args):
        key = owned_key(args[i])
        if key is None or OWNED[key].by != "node":
            out.append(args[i])
            i += 1
            continue
        nxt = args[i + 1] if i + 1 < len(args) else None
        takes_value = OWNED[key].takes_value or (nxt is not None and nxt.lower() in _BOOL_WORDS)
        i += 1 if (split_flag(args[i])[1] is not None or not takes_value) else 2
    return out


def arg_value(args: list[str], *names: str) -> str | None:
    """The last value given for any of `names` (both `--k v` and `--k=v`)."""
    found = None
    for i, arg in enumerate(args):
        key, value = split_flag(arg)
        if key in names:
            if value is not None:
                found = value
            elif i + 1 < len(args):
                found = args[i + 1]
    return found


# -- the config registry, read from source ---------------------------------------------


def titan_modules() -> set[str] | None:
    """TorchTitan's short module names (`--module llama3`), None without TorchTitan."""
    try:
        from torchtitan.experiments import _supported_experiments
        from torchtitan.models import _supported_models
    except ImportError:
        return None
    return set(_supported_models) | set(_supported_experiments)


def registry_file(module: str) -> Path | None:
    """The config_registry.py TorchTitan would import for `--module`, or None.

    Short names are looked up where `_load_config` tries them (models,
    experiments, experiments/rl/examples); anything else as a module
    `X.config_registry` or `X` on the import path.
    """
    short = titan_modules()
    if short is None or not re.match(r"^[A-Za-z0-9_.]+$", module):
        return None
    if module in short:
        root = Path(importlib.util.find_spec("torchtitan").origin).parent
        rel = module.replace(".", "/")
        for sub in ("models", "experiments", "experiments/rl/examples"):
            if (candidate := root / sub / rel / "config_registry.py").is_file():
                return candidate
        return None
    for name in (f"{module}.config_registry", module):
        if (found := _source_of(name)) is not None:
            return found
    return None


def _source_of(dotted: str) -> Path | None:
    """The .py file of a dotted module, found on disk below its top-level package
    (no parent package is imported: TorchTitan's import torch, and on CPU fail on triton)."""
    top, *rest = dotted.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    for base in spec.submodule_search_locations or ():
        path = Path(base, *rest)
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


@lru_cache(maxsize=None)
def titan_configs(module: str) -> dict[str, dict[str, int]] | None:
    """`--config` names of `module` -> the parallelism degrees they set; None when
    TorchTitan has no such module. A config is a public top-level function that
    takes no arguments (TorchTitan calls `config_fn()`)."""
    path = registry_file(module)
    if path is None:
        return None
    tree = ast.parse(path.read_text())
    configs: dict[str, dict[str, int]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and not node.args.args:
            configs[node.name] = {
                kw.arg: kw.value.value
                for call in ast.walk(node)
                if isinstance(call, ast.Call)
                for kw in call.keywords
                if kw.arg in PARALLEL_DEGREES and isinstance(kw.value, ast.Constant)
            }
    return configs


def model_problem(module: str | None, config: str | None) -> str | None:
    """What is wrong with a --module/--config pair, or None (one rule for recipe and node)."""
    if not module or not config:
        return "TorchTitan needs --module and --config (e.g. `--module llama3 --config llama3_debugmodel`)"
    short = titan_modules()
    if short is None:
        return "TorchTitan is not installed here (pip install torchtitan)"
    configs = titan_configs(module)
    if configs is None:
        return (f"unknown TorchTitan module {module!r}: not one of TorchTitan's models "
                f"({', '.join(sorted(short))}) and not an importable module with a config_registry")  # fmt: skip
    if config not in configs:
        names = sorted(c for c in configs if c.startswith(module.rsplit(".", 1)[-1])) or sorted(configs)
        return f"unknown TorchTitan config {config!r} for module {module!r}; available: {', '.join(names[:16])}"
    return None


# -- TorchTitan's own parser, in a child process ---------------------------------------


class CheckUnavailable(Exception):
    """The child could not give a verdict (it crashed, or TorchTitan does not import)."""


def explain(tyro_text: str, args: list[str]) -> str:
    """TorchTitan's (tyro's) error box -> one line that names the flag at fault."""
    sections: list[list[str]] = [[]]
    for raw in tyro_text.splitlines():
        if not raw.startswith("│"):
            continue
        line = raw.strip("│ ").rstrip()
        if set(line) <= set("─ "):
            sections.append([])
        elif line:
            sections[-1].append(line)
    sections = [s for s in sections if s]
    if not sections:
        lines = [ln.strip() for ln in tyro_text.splitlines() if ln.strip()]
        return lines[-1] if lines else "rejected by TorchTitan's parser"
    head = " ".join(sections[0])
    if head.startswith("Unrecognized options:"):
        flags = [t for t in head.split(":", 1)[1].replace(",", " ").split() if t.startswith("-")]
        hint = next((s for s in sections if s[0] == "Perhaps you meant:"), None)
        guess = f" (did you mean {hint[1].split()[0]}?)" if hint and len(hint) > 1 else ""
        return f"unknown option {', '.join(flags) or head}{guess}"
    m = re.match(r"Error parsing (\S+): (.*)", head)
    if m:
        target, why = m.groups()
        if target.startswith("--"):
            value = arg_value(args, target)
            return f"{target}{'' if value is None else ' ' + value}: {why}"
        flags = dict.fromkeys(split_flag(a)[0] for a in args if a.startswith(f"--{target}."))
        given = [f"{f} {arg_value(args, f) or ''}".rstrip() for f in flags]
        return f"{', '.join(given) or target}: {why}"
    return head


def _parse_in_this_process(args: list[str]) -> str | None:
    from torchtitan.config import ConfigManager

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            ConfigManager().parse_args(list(args))
    except SystemExit:
        return explain(captured.getvalue(), args)
    except ImportError:
        raise  # a package this machine lacks (e.g. torchao for float8): no verdict on the args
    except Exception as err:  # noqa: BLE001 - TorchTitan raises ValueError, ImportError, plain Exception
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
    return None


def _config_imports(args: list[str]) -> list[str]:
    """Top-level modules (beyond the stdlib) that the source files whose code runs while
    TorchTitan builds the config of `args` import: the model registry, its converters
    (TorchTitan 0.3.0's Float8LinearConverter.__init__ in components/quantization/float8.py
    raises "torchao is not installed"), whatever the config function calls. Files count
    whether or not their imports succeed here; only files of TorchTitan and of the
    `--module`'s own package are read (other libraries' optional imports are theirs)."""
    from torchtitan.config import ConfigManager

    def build() -> None:
        # a failing build still ran the code it names
        with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit, Exception):
            ConfigManager().parse_args(list(args))

    build()  # imports the config registry: what merely importing it imports is not the config's doing
    ran: set[str] = set()

    def note(frame, event, _arg):
        if event == "call":
            ran.add(frame.f_code.co_filename)

    sys.setprofile(note)
    try:
        build()
    finally:
        sys.setprofile(None)
    module = arg_value(args, "--module") or ""
    tops = {"torchtitan"} if module in (titan_modules() or ()) else {"torchtitan", module.split(".")[0]}
    roots = [str(Path(d)) + os.sep for top in tops if (spec := importlib.util.find_spec(top))
             for d in spec.submodule_search_locations or ()]
    found = set().union(*(imports_of(Path(f)) for f in ran if f.startswith(tuple(roots))))
    return sorted(found - tops - set(sys.stdlib_module_names))


def imports_of(path: Path) -> set[str]:
    """Top-level names a source file imports: `import`/`from` statements anywhere in it
    (inside try/except and functions too) and `find_spec("x")`/`import_module("x")`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("find_spec", "import_module")):
            names.add(node.args[0].value.split(".")[0])
    return names


def _serve() -> None:
    """Child: one JSON request per stdin line -> one JSON answer per stdout line. A list of
    args -> {"error": verdict}; {"imports": args} -> {"imports": [module, ...]}."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever TorchTitan prints must not reach the reply channel
    from supervisor.titan import cpu_compat

    cpu_compat.apply()  # as supervisor.titan.train does before TorchTitan is imported
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if isinstance(request, dict):
                answer = {"imports": _config_imports(request["imports"])}
            else:
                answer = {"error": _parse_in_this_process(request)}
        except ImportError as err:
            answer = {"unavailable": f"{type(err).__name__}: {err}"}
        reply.write(json.dumps(answer) + "\n")


class TitanArgsCheck:
    """A child process running TorchTitan's parser; `submit` then `poll`/`result`."""

    def __init__(self, preexec_fn=None):
        self._proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()
        self._preexec_fn = preexec_fn  # e.g. the node's "die with me" (PR_SET_PDEATHSIG)

    def submit(self, args: list[str]) -> None:
        self._send(list(args))

    def submit_imports(self, args: list[str]) -> None:
        """Ask which modules the config of `args` imports (answered by `imports`)."""
        self._send({"imports": list(args)})

    def _send(self, request: list | dict) -> None:
        if self._proc is None:
            env = {**os.environ, "COLUMNS": "1000", "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"}
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor.titan_config"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=self._log, env=env, text=True, start_new_session=True, preexec_fn=self._preexec_fn,
            )  # fmt: skip
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()

    def result(self, timeout_s: float) -> str | None:
        """The oldest pending verdict: None = accepted, else the reason. Raises
        TimeoutError when none came in time, CheckUnavailable when the child died."""
        return self._answer(timeout_s)["error"]

    def imports(self, timeout_s: float) -> list[str]:
        """The oldest pending answer to submit_imports (raises as `result` does)."""
        return self._answer(timeout_s)["imports"]

    def _answer(self, timeout_s: float) -> dict:
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            if not sel.select(max(0.0, timeout_s)):
                raise TimeoutError("no verdict from TorchTitan's parser yet")
        line = self._proc.stdout.readline()
        if not line:
            self._log.seek(0)
            tail = self._log.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise CheckUnavailable(f"TorchTitan's parser did not run: {tail[0]}")
        answer = json.loads(line)
        if answer.get("unavailable"):
            raise CheckUnavailable(answer["unavailable"])
        return answer

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.kill()
            self._proc.wait()
        self._proc = None


_shared: TitanArgsCheck | None = None
_verdicts: dict[tuple[str, ...], str | None] = {}


def check_args(args: list[str], timeout_s: float = 300.0) -> str | None:
    """None when TorchTitan's parser accepts `args`, else one line naming the bad flag.
    One child serves every check of this process; verdicts are remembered. Raises
    CheckUnavailable / TimeoutError when no verdict could be had."""
    key = tuple(args)
    if key not in _verdicts:
        _verdicts[key] = _ask(lambda child: child.submit(list(args)), lambda child: child.result(timeout_s))
    return _verdicts[key]


@lru_cache(maxsize=None)
def config_imports(args: tuple[str, ...], timeout_s: float = 300.0) -> tuple[str, ...]:
    """Top-level modules beyond the stdlib that the code building the TorchTitan config
    of `args` imports (see _config_imports), from the child that serves check_args."""
    return tuple(_ask(lambda child: child.submit_imports(list(args)), lambda child: child.imports(timeout_s)))


def _ask(send, receive):
    """One request to the shared child; a dead or late child is replaced at the next request."""
    global _shared
    if _shared is None:
        _shared = TitanArgsCheck()
        atexit.register(_shared.close)
    send(_shared)
    try:
        return receive(_shared)
    except (TimeoutError, CheckUnavailable) as err:
        if not str(err).startswith("ImportError"):
            _shared.close()
            _shared = None
        raise


if __name__ == "__main__":
    _serve()
