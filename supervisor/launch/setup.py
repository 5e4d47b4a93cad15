"""The task's setup script: what runs on every node before the node command.

SkyPilot runs it on every node of a fresh cluster (so again after each
recovery, which re-provisions); the local backend runs it once per node
directory before the first incarnation. It installs pinned torch/TorchTitan/
supervise into a venv (`install.pip`) and fetches or builds the tokenizer.
Relative paths in it (the recipe's asset paths) are relative to the node's
working directory.
"""

from __future__ import annotations

import shlex
from importlib import metadata

from supervisor.spec import JobSpec

VENV = "~/.supervise/venv"  # where setup installs torch, TorchTitan and supervise on the node
# The venv is usable when what `supervise node` imports at start imports.
VENV_CHECK = f"{VENV}/bin/python -c 'import supervisor.cli, supervisor.node, torch, torchtitan'"


def _pinned(dist: str) -> str:
    """The launching machine's version of `dist`, without a local tag (+cpu)."""
    try:
        return metadata.version(dist).split("+")[0]
    except metadata.PackageNotFoundError:
        return ""


def setup_script(spec: JobSpec) -> str:
    """Install pinned torch/TorchTitan/supervise into a venv and fetch the tokenizer."""
    inst = spec.install
    lines = ["set -euo pipefail"]
    if inst.pip:
        torch = inst.torch or _pinned("torch")
        titan = inst.torchtitan or _pinned("torchtitan")
        torch_req = f"torch=={torch}" if torch else "torch"
        index = ["--index-url", inst.index_url] if inst.index_url else []
        # A venv left half-deleted (e.g. by the clean-up of a cancelled cluster
        # whose HOME survives) is rebuilt from scratch; a healthy one is reused
        # and the pip installs below are then quick no-ops.
        lines += [
            f"if ! {VENV_CHECK} >/dev/null 2>&1; then",
            f"  echo 'supervise setup: (re)building {VENV}'",
            f"  rm -rf {VENV}",
            f"  python3 -m venv {VENV} || ~/.local/bin/uv venv --seed {VENV}",
            "fi",
            f". {VENV}/bin/activate",
            "pip install --upgrade pip",
            shlex.join(["pip", "install", torch_req, *index]),
            shlex.join(["pip", "install", f"torchtitan=={titan}" if titan else "torchtitan",
                        _requirement("supervise", inst.supervise), *_store_packages(spec), *inst.extra]),
        ]
    else:  # the image provides the packages; a damaged venv must not shadow them
        lines += [
            f"if [ -e {VENV} ] && ! {VENV_CHECK} >/dev/null 2>&1; then",
            f"  echo 'supervise setup: removing damaged {VENV}; using the image python'",
            f"  rm -rf {VENV}",
            "fi",
            f"if [ -f {VENV}/bin/activate ]; then . {VENV}/bin/activate; fi",
        ]
    tok = spec.tokenizer
    if tok.tiny:
        lines.append(shlex.join([
            "python", "-c",
            "import sys; from supervisor.titan.tinydata import build_assets; build_assets(sys.argv[1])",
            _tiny_root(spec)]))
    elif tok.hf_repo:
        lines.append(shlex.join([
            "hf", "download", tok.hf_repo, "--local-dir", tok.path,
            "--include", "tokenizer*", "special_tokens_map.json", "original/tokenizer.model"]))
    return "\n".join(lines) + "\n"


def _tiny_root(spec: JobSpec) -> str:
    """build_assets(root) makes root/hf_assets; the recipe names that folder as tokenizer.path."""
    return spec.tokenizer.path.rstrip("/").rsplit("/", 1)[0] or "."


def _requirement(dist: str, pin: str) -> str:
    """`1.2.3` -> `dist==1.2.3`; a URL, path or full requirement is used as given."""
    return f"{dist}=={pin}" if pin and pin[0].isdigit() else pin or dist


def _store_packages(spec: JobSpec) -> list[str]:
    return ["gcsfs"] if spec.checkpoints_url.startswith("gs://") else []
