"""The task's setup script: what runs on every node before the node command.

SkyPilot runs it on every node of a fresh cluster (so again after each
recovery, which re-provisions); the local backend runs it once per node
directory before the first incarnation. With `install.pip` it makes a
Python >= 3.11 venv (TorchTitan 0.3.0 needs it; SkyPilot's default images are
Ubuntu 22.04 with 3.10, so uv fetches the interpreter) and installs pinned
torch/TorchTitan plus the wheel of the supervise code being launched (shipped
with the job: see launch.wheel); then it checks that `import supervisor` is
ours (supervisord ships a package of that name) and fetches or builds the
tokenizer. Relative paths in it (the recipe's asset paths) are relative to the
node's working directory.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from supervisor import DIST
from supervisor.errors import SuperviseError
from supervisor.launch import wheel
from supervisor.contract.layout import RunLayout, ledger_url
from supervisor.spec import JobSpec, titan_args
from supervisor.store import envsnap
from supervisor.titan_config import CheckUnavailable, config_imports

VENV = "~/.supervise/venv"  # where setup installs torch, TorchTitan and supervise on the node
# Where SkyPilot's runtime set-up puts uv on every node (sky/skylet/constants.py, SKY_UV_INSTALL_DIR).
SKY_UV = "$HOME/.local/bin/uv"
# `import supervisor` must be supervise's, not supervisord's package of the same name.
_OURS = f'getattr(supervisor, "DIST", None) == "{DIST}"'
# The venv is reused when it has a new enough Python and what `supervise node` imports at start imports.
VENV_CHECK = (f"{VENV}/bin/python -c " + shlex.quote(
    f"import sys, supervisor, supervisor.cli, supervisor.node, torch, torchtitan; "
    f"sys.exit(not (sys.version_info >= (3, 11) and {_OURS}))"))
# huggingface_hub 1.x's `hf download`: one value per --include (checked against its CLI in tests).
HF_HUB = "huggingface_hub>=1.0,<2"
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "original/tokenizer.model")
# Versions of what a TorchTitan config imports when the launching machine lacks it (else
# its own version is pinned, as for torch). torchao 0.18.0 loads its kernels with torch
# >= 2.11 (torchao/__init__.py, min_torch_version), below what TorchTitan 0.3.0 needs.
KNOWN_GOOD = {"torchao": "0.18.0"}
# Errors that another try cannot fix, as the tools print them: pip (resolvelib factory's
# DistributionNotFound; download.py's "HTTP error %s while getting"; install.py's OSError,
# e.g. a wheel path the file mount did not deliver), uv (uv-python's NoDownloadFound; no
# interpreter when downloads are off), `hf` (huggingface_hub/cli/_errors.py: gated,
# not found, revision, file, not logged in; other HfHubHTTPErrors as httpx words them).
PERMANENT = "|".join([
    "No matching distribution found", "HTTP error 40[134] while getting", r"due to an OSError: \[Errno 2\]",
    "No download found for request", "No interpreter found for Python",
    r"Error: Access denied\.", r"not found\. If the (repo|bucket) is private", "Revision not found in",
    "File not found in", r"Not logged in\.", "Client error '40[134] ",
])
# supervise_retry STEP CMD...: every network step of setup (uv's Python, pip, `hf download`)
# runs through it. A failure is tried again, 5 tries in all, 10/20/40/80 s apart plus up to
# as much jitter (every node of a cluster hits the index at once), each retry named in the
# log with the step's last error line; a PERMANENT error fails at once with one line. pip says "No matching distribution"
# also when an index page could not be fetched (a 5xx after its own retries, a refused
# connection); only its --log (PIP_LOG) names the page ("Could not fetch URL ...: <why> -
# skipping", pip/_internal/index/collector.py), so a page lost to anything but a 4xx retries.
RETRY_FUNCTION = r"""supervise_retry() {
  local step=$1 try=1 rc wait=${SUPERVISE_SETUP_RETRY_S:-10} err piplog last lost
  shift
  err=$(mktemp) piplog=$(mktemp)
  while true; do
    : >"$piplog"
    PIP_LOG=$piplog "$@" 2>"$err" && rc=0 || rc=$?
    cat "$err" >&2
    [ "$rc" = 0 ] && break
    last=$( (grep -i 'error' "$err" || grep -v '^[[:space:]]*$' "$err" || true) | tail -n 1)
    lost=$(grep 'Could not fetch URL' "$piplog" | grep -vE ' 4[0-9][0-9] Client Error' || true)
    if [ -z "$lost" ] && grep -qE "$SUPERVISE_PERMANENT" "$err"; then
      echo "supervise setup: error: $step failed (not retried): $(grep -m1 -E "$SUPERVISE_PERMANENT" "$err")" >&2
      break
    fi
    if [ "$try" -ge 5 ]; then
      echo "supervise setup: error: $step failed $try times, the last after: $last" >&2
      break
    fi
    try=$((try + 1))
    echo "supervise setup: retry $try/5 of $step after: $last" >&2
    sleep $((wait + RANDOM % (wait + 1)))
    wait=$((wait * 2))
  done
  rm -f "$err" "$piplog"
  return "$rc"
}"""


def _pinned(dist: str) -> str:
    """The launching machine's version of `dist`, without a local tag (+cpu)."""
    try:
        return metadata.version(dist).split("+")[0]
    except metadata.PackageNotFoundError:
        return ""


def wheel_root() -> Path:
    """Where `start` keeps the wheels it built (one folder per content hash)."""
    return Path(os.environ.get("SUPERVISE_HOME", Path.home() / ".supervise")) / "wheels"


def shipped_wheel(spec: JobSpec) -> wheel.Wheel | None:
    """The wheel setup installs, when supervise is not given as a pip spec (built once per content)."""
    if not spec.install.pip or spec.install.supervise:
        return None
    return wheel.build(wheel_root())


def shipped_files(built: wheel.Wheel | None) -> dict[str, str]:
    """Node folder -> local folder that must travel with the job (a directory mount, never a file)."""
    return {wheel.REMOTE_DIR: str(built.directory)} if built else {}


def setup_script(spec: JobSpec, built: wheel.Wheel | None) -> str:
    """Install pinned torch/TorchTitan/supervise (`built`: the shipped wheel, from
    shipped_wheel) into a venv and fetch the tokenizer — unless this node already has
    what this setup makes (its fingerprint, SETUP_KEY, in each folder: reused) or the
    bucket has a snapshot of it (restored: store.envsnap); a full install publishes one."""
    inst = spec.install
    lines = ["set -euo pipefail", "SUPERVISE_SETUP_T0=$(date +%s.%N)",
             f"SUPERVISE_PERMANENT={shlex.quote(PERMANENT)}", RETRY_FUNCTION]
    assets, asset_lines = _asset_lines(spec)
    if not inst.pip:  # the image provides the packages; a damaged venv must not shadow them
        lines += [
            f"if [ -e {VENV} ] && ! {VENV_CHECK} >/dev/null 2>&1; then",
            f"  echo 'supervise setup: removing damaged {VENV}; using the image python'",
            f"  rm -rf {VENV}",
            "fi",
            f"if [ -f {VENV}/bin/activate ]; then . {VENV}/bin/activate; fi",
            shlex.join(["python", "-c", _ours_check(built.version if built else None)]),
            *asset_lines, "supervise_how=reused  # the image brought the packages",
        ]
        return "\n".join(lines + _end_lines(spec)) + "\n"
    install = _venv_lines(inst.python) + _install_lines(spec, built)
    key = fingerprint(install + asset_lines)
    snapshots = bool(built)  # a fresh node imports the snapshot code from the shipped wheel
    lines += [
        f"SUPERVISE_SETUP_KEY={key}  # fingerprint of what this setup installs (setup.fingerprint)",
        f"SUPERVISE_ENV_URL=${{SUPERVISE_ENV_URL-{shlex.quote(env_url(spec) if snapshots else '')}}}"
        "  # the snapshots; set empty to turn them off",
        *_lock_lines(),
        "supervise_has() { [ \"$(cat \"$1\"/" + envsnap.KEY_FILE + " 2>/dev/null)\" = \"$SUPERVISE_SETUP_KEY\" ]; }",
        "supervise_how=reused need_venv= need_assets=",
        f"supervise_has {VENV} && {VENV_CHECK} >/dev/null 2>&1 || need_venv=1",
        *[f"supervise_has {shlex.quote(a)} || need_assets=1" for a in assets],
    ]
    if snapshots:
        lines += _restore_lines(spec, built, assets)
    lines += [
        'if [ "$supervise_how" != restored ] && [ -n "$need_venv" ]; then',
        "  supervise_how=installed",
        f"  rm -f {VENV}/{envsnap.KEY_FILE}",
        *["  " + line for line in install],
        f'  echo "$SUPERVISE_SETUP_KEY" > {VENV}/{envsnap.KEY_FILE}',
        "fi",
        f". {VENV}/bin/activate",
        shlex.join(["python", "-c", _ours_check(built.version if built else None)]),
    ]
    if asset_lines:
        lines += ['if [ "$supervise_how" != restored ] && [ -n "$need_assets" ]; then',
                  "  supervise_how=installed", *["  " + line for line in asset_lines],
                  *[f'  echo "$SUPERVISE_SETUP_KEY" > {shlex.quote(a)}/{envsnap.KEY_FILE}' for a in assets], "fi"]
    # after a full install, the node that claims the key first publishes what it made (a failure is one warning)
    if snapshots:
        lines += ['if [ "$supervise_how" = installed ] && [ -n "$SUPERVISE_ENV_URL" ]; then',
                  "  supervise_snapshot=$(" + shlex.join(["python", "-m", "supervisor.store.envsnap", "publish", "--url"])
                  + ' "$SUPERVISE_ENV_URL" --key "$SUPERVISE_SETUP_KEY" '
                  + " ".join([f"--venv {VENV}", *[f"--asset {shlex.quote(a)}" for a in assets]]) + " 2>&1) || true",
                  '  [ -z "$supervise_snapshot" ] || echo "$supervise_snapshot"',
                  "fi"]
    lines.append("exec 9>&-  # lets go of the setup lock")
    return "\n".join(lines + _end_lines(spec)) + "\n"


def fingerprint(install_lines: list[str]) -> str:
    """The key of what setup makes: the commands that install and fetch it (Python version,
    every pinned package, the index, the shipped wheel's content hash in its name, the
    tokenizer repo and its patterns, the assets built) and the snapshot format."""
    text = "\n".join([f"envsnap format {envsnap.FORMAT}", *install_lines])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def env_url(spec: JobSpec) -> str:
    """Where a run's environment snapshots live (store.envsnap)."""
    return RunLayout(spec.checkpoints_url).env_snapshots


def _lock_lines() -> list[str]:
    """One setup at a time per HOME (nodes sharing an NFS HOME, local Slurm nodes): the
    second waits, then finds the first one's venv and reuses it. flock(1), util-linux."""
    return [
        "mkdir -p ~/.supervise",
        "exec 9>>~/.supervise/setup.lock",
        "if ! flock -n 9; then",
        "  echo 'supervise setup: waiting for another setup in this HOME (~/.supervise/setup.lock)'",
        "  flock 9",
        "fi",
    ]


def _restore_lines(spec: JobSpec, built: wheel.Wheel, assets: list[str]) -> list[str]:
    """What the node lacks, from the bucket's snapshot: run by the system python3 with the
    store's packages installed beside it (no venv yet), the shipped wheel on its path."""
    reqs = shlex.join(f"{d}=={v}" if (v := _pinned(d)) else d
                      for d in ("fsspec", *(_store_packages(spec) or ["s3fs"]), "tenacity"))
    tools = '"$HOME/.supervise/envsnap-tools"'
    target = f"--target {tools} {reqs} || return 1"
    return [
        "supervise_restore() {",
        f'  local path="$HOME/.supervise/envsnap-tools:$HOME/{built.remote_path.removeprefix("~/")}" uv',
        '  if ! PYTHONPATH="$path" python3 -c "import supervisor.store.envsnap" >/dev/null 2>&1; then',
        f"    rm -rf {tools}",
        f'    uv="{SKY_UV}"; [ -x "$uv" ] || uv="$(command -v uv || true)"',
        '    if [ -n "$uv" ]; then',
        f"      supervise_retry 'snapshot tools' \"$uv\" pip install --quiet --python python3 {target}",
        "    else",
        f"      supervise_retry 'snapshot tools' python3 -m pip install --quiet {target}",
        "    fi",
        "  fi",
        '  PYTHONPATH="$path" python3 -m supervisor.store.envsnap restore --url "$SUPERVISE_ENV_URL" '
        '--key "$SUPERVISE_SETUP_KEY" "$@"',
        "}",
        "supervise_want=()",
        '[ -z "$need_venv" ] || supervise_want+=(--venv "$HOME/.supervise/venv")',
        *[f'[ -z "$need_assets" ] || supervise_want+=(--asset {shlex.quote(a)})' for a in assets],
        'if [ -n "$need_venv$need_assets" ] && [ -n "$SUPERVISE_ENV_URL" ] && command -v python3 >/dev/null '
        '&& supervise_restore "${supervise_want[@]}"',
        f'then if [ -z "$need_venv" ] || {VENV_CHECK} >/dev/null 2>&1; then supervise_how=restored; fi; fi',
    ]


def _install_lines(spec: JobSpec, built: wheel.Wheel | None) -> list[str]:
    """pip (or uv pip, where uv is: SkyPilot installs it on every node) of torch, TorchTitan,
    the extra packages and supervise into the venv, every one through supervise_retry."""
    inst = spec.install
    torch = inst.torch or _pinned("torch")
    titan = inst.torchtitan or _pinned("torchtitan")
    index = ["--index-url", inst.index_url] if inst.index_url else []
    ours = f'"$HOME/{built.remote_path.removeprefix("~/")}"' if built else shlex.quote(inst.supervise or "")
    torch_req = f"torch=={torch}" if torch else "torch"
    rest = [f"torchtitan=={titan}" if titan else "torchtitan", *_store_packages(spec), *inst.extra]
    if spec.tokenizer.hf_repo:
        rest.append(HF_HUB)
    rest += config_packages(spec, [torch_req, *rest, DIST])
    # --link-mode copy: uv hardlinks from its cache by default, and another job of the user
    # linking or unlinking the same cached files changes them under the snapshot's tar
    # (seen on the local Slurm: "libtorch_cpu.so: file changed as we read it", not published)
    return [
        f'supervise_uv="{SKY_UV}"; [ -x "$supervise_uv" ] || supervise_uv="$(command -v uv || true)"',
        "supervise_pip() {",
        f'  if [ -n "$supervise_uv" ]; then "$supervise_uv" pip install --link-mode copy --python {VENV}/bin/python "$@"; '
        'else python -m pip install "$@"; fi',
        "}",
        "[ -n \"$supervise_uv\" ] || supervise_retry 'pip install pip' python -m pip install --upgrade pip",
        shlex.join(["supervise_retry", "pip install torch", "supervise_pip", torch_req, *index]),
        f"{shlex.join(['supervise_retry', 'pip install torchtitan', 'supervise_pip', *rest])} {ours}",
    ]


def _asset_lines(spec: JobSpec) -> tuple[list[str], list[str]]:
    """(the folders setup fills with the recipe's assets, the lines that fill them)."""
    tok = spec.tokenizer
    if tok.tiny:
        root = _tiny_root(spec)
        return [root], [shlex.join([
            "python", "-c",
            "import sys; from supervisor.titan.tinydata import build_assets; build_assets(sys.argv[1])", root])]
    if tok.hf_repo:
        include = [arg for pattern in TOKENIZER_FILES for arg in ("--include", pattern)]
        return [tok.path], [shlex.join(["supervise_retry", "hf download", "hf", "download", tok.hf_repo,
                                        "--local-dir", tok.path, *include])]
    return [], []


def _end_lines(spec: JobSpec) -> list[str]:
    """The run's ledger gets setup's time, how, and what became of the snapshot it published
    (never fails setup; the report's setup phase)."""
    return [
        shlex.join(["python", "-m", "supervisor.ledger.mark", "setup", "--started-at"])
        + ' "$SUPERVISE_SETUP_T0" --how "$supervise_how" --snapshot "$(printf %s "${supervise_snapshot:-}" | tail -n 1)" '
        + shlex.join(["--ledger", ledger_url(spec.checkpoints_url)]) + " || true",
        'echo "supervise setup: done in $(( $(date +%s) - ${SUPERVISE_SETUP_T0%.*} )) s ($supervise_how)"',
    ]


def _venv_lines(python: str) -> list[str]:
    """Reuse a healthy venv, else (re)build it for `python` (a venv left half-deleted,
    e.g. by the clean-up of a cancelled cluster whose HOME survives, is rebuilt)."""
    need = tuple(int(p) for p in python.split(".")[:2])
    return [
        f"if ! {VENV_CHECK} >/dev/null 2>&1; then",
        f"  echo 'supervise setup: (re)building {VENV} with Python {python}'",
        f"  rm -rf {VENV}",
        f'  uv="{SKY_UV}"; [ -x "$uv" ] || uv="$(command -v uv || true)"',
        '  if [ -n "$uv" ]; then',
        f'    supervise_retry "uv venv (Python {python})" "$uv" venv --seed --python {shlex.quote(python)} {VENV}',
        f"  elif python3 -c 'import sys; sys.exit(sys.version_info[:2] < {need})'; then",
        f"    python3 -m venv {VENV}",
        "  else",
        f"    echo 'supervise setup: error: needs Python >= {python} (TorchTitan 0.3.0) and found neither uv "
        f"nor a python3 that new; use an image with uv or python{python}' >&2",
        "    exit 1",
        "  fi",
        "fi",
        f". {VENV}/bin/activate",
    ]


def _ours_check(version: str | None) -> str:
    """Python that exits with one `error:` line unless `supervisor` is ours (and the shipped
    version), else says which Python the node runs (a reused venv prints nothing else about it)."""
    code = [
        "import sys, supervisor",
        f'{_OURS} or sys.exit("supervise setup: error: import supervisor gives " + supervisor.__file__ + '
        f'", which is not {DIST} (supervisord ships a package of that name); remove it from the image or venv")',
    ]
    if version:
        code += [
            "from importlib.metadata import version",
            f'version("{DIST}") == "{version}" or sys.exit("supervise setup: error: {DIST} " + version("{DIST}") + '
            f'" is installed, not the shipped {version}")',
        ]
    code.append(f'print("supervise setup: {DIST} in " + sys.prefix + ", Python " + sys.version.split()[0])')
    return "; ".join(code)


def _tiny_root(spec: JobSpec) -> str:
    """build_assets(root) makes root/hf_assets; the recipe names that folder as tokenizer.path."""
    return spec.tokenizer.path.rstrip("/").rsplit("/", 1)[0] or "."


def _store_packages(spec: JobSpec) -> list[str]:
    return ["gcsfs"] if spec.checkpoints_url.startswith("gs://") else []


def config_packages(spec: JobSpec, installs: list[str]) -> list[str]:
    """Requirements for the modules the recipe's TorchTitan config imports that neither
    `installs` (setup's other requirements) nor their requirements provide: e.g. torchao,
    which TorchTitan 0.3.0 imports only when a config uses its float8/mx converters."""
    try:
        wanted = set(config_imports(tuple(titan_args(spec))))
    except (CheckUnavailable, TimeoutError) as err:
        raise SuperviseError(f"cannot tell which packages TorchTitan's config {spec.model.config!r} imports: {err}; "
                             "check that `python -m torchtitan.train` imports here") from None
    installed = _closure(installs)
    owners = metadata.packages_distributions()
    provided = {module for module, dists in owners.items() if {canonicalize_name(d) for d in dists} & installed}
    out = set()
    for module in wanted - provided - {name.replace("-", "_") for name in installed}:
        dist = owners.get(module, [module])[0]
        version = _pinned(dist) or KNOWN_GOOD.get(canonicalize_name(dist))
        out.add(f"{dist}=={version}" if version else dist)
    return sorted(out)


def _closure(requirements: list[str]) -> set[str]:
    """Canonical names of `requirements` and, for those installed here, what they require
    (markers as on this machine; extras only where asked for)."""
    seen: set[str] = set()
    todo = _applicable(requirements, extras=())
    while todo:
        req = todo.pop()
        if (name := canonicalize_name(req.name)) in seen:
            continue
        seen.add(name)
        try:
            todo += _applicable(metadata.requires(req.name) or [], extras=req.extras)
        except metadata.PackageNotFoundError:
            pass
    return seen


def _applicable(requirements: list[str], extras) -> list[Requirement]:
    out = []
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement:  # a wheel path or URL
            continue
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {"", *extras}):
            out.append(req)
    return out
