"""The rendered setup of llama3_debug executed for real: bash, the real pip (torch from this
machine's local CPU wheel, the rest from its package indexes), the real snapshot in a real
SeaweedFS bucket, in a temporary HOME.

One HOME goes through a node's life: two setups at once on a fresh node (one installs and
publishes the snapshot, the other waits for the HOME's lock and reuses), the same node again
(reuses: no installer runs), a fresh VM with the bucket kept (restores), and a corrupt
snapshot part (one line why, a full install). After each the venv imports supervise, torch
and TorchTitan. Nothing here stands in for anything but SkyPilot's file mount of the wheel
(a copy) and its node rank variable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.launch import setup
from supervisor.recipes import build_spec
from supervisor.store import envsnap
from supervisor.store.fs import Store

pytestmark = pytest.mark.timeout(1500)


def _local_torch_wheel() -> bool:
    """pip here takes torch from a wheel on disk (find-links), not a multi-GB download."""
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    links = os.environ.get("PIP_FIND_LINKS", "").split() + [
        line.split("=", 1)[1].strip("'\" ") for line in out.splitlines() if ".find-links=" in line]
    want = f"torch-{version('torch').split('+')[0]}+cpu-"
    return any(p.name.startswith(want) for d in links if Path(d).is_dir() for p in Path(d).iterdir())


def _pip_env() -> dict[str, str]:
    """This machine's pip configuration, which a temporary HOME would hide (its user config, cache)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
    user_conf = Path.home() / ".config" / "pip" / "pip.conf"
    if user_conf.exists() and "PIP_CONFIG_FILE" not in env:
        env["PIP_CONFIG_FILE"] = str(user_conf)
    env.setdefault("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    return env


def _imports(home: Path) -> str:
    out = subprocess.run([str(home / ".supervise/venv/bin/python"), "-c",
                          "import supervisor, torch, torchtitan; print(supervisor.DIST, torch.__version__)"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(not shutil.which("flock"), reason="flock(1) (util-linux) is not installed")
def test_a_node_installs_reuses_restores_and_survives_a_corrupt_snapshot(tmp_path, s3_url, monkeypatch):
    if not _local_torch_wheel():
        pytest.skip("no local torch CPU wheel for pip (find-links): a real install would download GBs")
    monkeypatch.setenv("SUPERVISE_BUCKET", s3_url)
    monkeypatch.setenv("SUPERVISE_HOME", str(tmp_path / "supervise-home"))
    spec = build_spec("llama3_debug")
    built = setup.shipped_wheel(spec)
    script = setup.setup_script(spec, built)
    key = script.split("SUPERVISE_SETUP_KEY=", 1)[1].split()[0]
    home, work = tmp_path / "home", tmp_path / "home" / "sky_workdir"
    (home / ".supervise/wheel").mkdir(parents=True)  # what the task's file mount delivers
    shutil.copy(built.directory / built.filename, home / ".supervise/wheel")
    work.mkdir()
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), **aws, **_pip_env()}

    def start(rank: int = 0) -> subprocess.Popen:
        return subprocess.Popen(["bash", "-c", script], cwd=work, env={**env, "SKYPILOT_NODE_RANK": str(rank)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(proc: subprocess.Popen) -> str:
        out = proc.communicate(timeout=1200)[0]
        assert proc.returncode == 0, out[-4000:]
        return out

    # A fresh node, two setups at once in one HOME (nodes sharing an NFS home).
    first, second = start(0), start(0)
    outs = [finish(first), finish(second)]
    installed = next(o for o in outs if o.rstrip().endswith("(installed)"))
    waited = next(o for o in outs if o is not installed)
    assert "supervise setup: waiting for another setup in this HOME" in waited
    assert waited.rstrip().endswith("(reused)") and "Successfully installed" not in waited
    assert f"supervise setup: snapshot {key} published:" in installed
    assert _imports(home).startswith("supervise-titan 2.")
    assert (home / ".supervise/venv" / envsnap.KEY_FILE).read_text().strip() == key

    # The same node again: no installer, no download.
    again = finish(start())
    assert again.rstrip().endswith("(reused)")
    assert not any(w in again for w in ("Collecting", "Successfully installed", "restored from"))
    _imports(home)

    # A fresh VM with the bucket kept: everything setup made on the node is gone.
    for gone in (home / ".supervise/venv", home / ".supervise/envsnap-tools", work / "supervise-assets"):
        shutil.rmtree(gone)
    restored = finish(start())
    assert f"supervise setup: restored from snapshot {key}:" in restored
    assert restored.rstrip().endswith("(restored)") and "Successfully installed torch" not in restored
    assert (work / "supervise-assets/hf_assets/tokenizer.json").exists()
    _imports(home)

    # A corrupt part: one line why, the snapshot deleted, a full install that works and
    # publishes a good snapshot in its place (whichever node installed claims the key).
    store = Store(setup.env_url(spec))
    manifest = json.loads(store.cat(key, envsnap.MANIFEST))
    part = next(i for i in manifest["items"] if i["role"] == "venv")["parts"][-1]
    data = store.cat(key, manifest["writer"], part["name"])
    store.put(data[:-1] + bytes([data[-1] ^ 1]), key, manifest["writer"], part["name"])
    shutil.rmtree(home / ".supervise/venv")
    shutil.rmtree(work / "supervise-assets")
    rebuilt = finish(start(rank=1))
    assert f"supervise setup: snapshot {key} is corrupt (part {part['name']} does not match the manifest" in rebuilt
    assert rebuilt.rstrip().endswith("(installed)") and f"snapshot {key} published:" in rebuilt
    again = json.loads(store.cat(key, envsnap.MANIFEST))
    assert again["writer"] != manifest["writer"] and manifest["writer"] not in store.listdir(key)
    _imports(home)
