"""The rendered setup of llama3_debug executed for real: bash, the real pip (torch from this
machine's local CPU wheel, the rest from its package indexes), the real snapshot in a real
SeaweedFS bucket, in a temporary HOME.

One HOME goes through a node's life: a fresh node whose bucket holds a snapshot of its key
with a corrupt part, two setups at once (one says why it cannot restore, deletes the
snapshot, installs in full and publishes a good one; the other waits for the HOME's lock
and reuses), the same node again (reuses: no installer runs), a fresh VM with the bucket
kept (restores). After each the venv imports supervise, torch and TorchTitan. Nothing here
stands in for anything but SkyPilot's file mount of the wheel (a copy) and its node rank
variable. The corrupt snapshot is the real publish of a small stand-in of the venv and
assets (a bare venv, one file): the part check refuses its bytes before tar reads any, as
it would a real venv's, and CI pays one full install instead of two.
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
def test_a_node_survives_a_corrupt_snapshot_installs_reuses_and_restores(tmp_path, s3_url, monkeypatch):
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

    # The bucket holds this key's snapshot with a corrupt part (see the module docstring).
    store = Store(setup.env_url(spec))
    stand_ins = [("venv", home / ".supervise/venv"), ("asset", work / "supervise-assets")]
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(stand_ins[0][1])], check=True)
    for _, folder in stand_ins[1:]:
        folder.mkdir(parents=True)
        (folder / "stand-in").write_text("not what setup makes")
    assert "published" in envsnap.publish(store, key, [(r, str(f)) for r, f in stand_ins], str(home), str(work))
    for _, folder in stand_ins:
        shutil.rmtree(folder)
    corrupt = json.loads(store.cat(key, envsnap.MANIFEST))
    part = next(i for i in corrupt["items"] if i["role"] == "venv")["parts"][-1]
    data = store.cat(key, corrupt["writer"], part["name"])
    store.put(data[:-1] + bytes([data[-1] ^ 1]), key, corrupt["writer"], part["name"])

    # A fresh node, two setups at once in one HOME (nodes sharing an NFS home): the one that
    # gets the lock finds the snapshot corrupt (one line why, deleted), installs in full and
    # publishes a good one in its place (whichever node installed claims the key).
    first, second = start(0), start(1)
    outs = [finish(first), finish(second)]
    installed = next(o for o in outs if o.rstrip().endswith("(installed)"))
    waited = next(o for o in outs if o is not installed)
    assert f"supervise setup: snapshot {key} is corrupt (part {part['name']} does not match the manifest" in installed
    assert "supervise setup: waiting for another setup in this HOME" in waited
    assert waited.rstrip().endswith("(reused)") and "Successfully installed" not in waited
    assert f"supervise setup: snapshot {key} published:" in installed
    good = json.loads(store.cat(key, envsnap.MANIFEST))
    assert good["writer"] != corrupt["writer"] and corrupt["writer"] not in store.listdir(key)
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
