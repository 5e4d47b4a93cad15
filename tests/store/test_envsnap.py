"""Environment snapshots on a real SeaweedFS: publish once (conditional create), restore
byte for byte, refuse what this node cannot use, delete a corrupt one, keep the newest 2."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.store import envsnap
from supervisor.store.fs import Store


def _tree(root: Path) -> dict[str, bytes | str]:
    """Files (bytes) and symlinks (their target) under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


@pytest.fixture
def node(tmp_path):
    """A HOME with a venv whose Python lies in HOME (as uv's does) and an asset folder in the working dir."""
    home, cwd = tmp_path / "home", tmp_path / "home" / "work"
    py = home / ".local/share/uv/python/cpython-3.11.9-linux-x86_64-gnu"
    (py / "bin").mkdir(parents=True)
    (py / "bin/python3.11").write_bytes(b"\x7fELF stand-in interpreter")
    venv = home / ".supervise/venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").symlink_to(py / "bin/python3.11")
    (venv / "pyvenv.cfg").write_text(f"home = {py / 'bin'}\nversion_info = 3.11.9\n")
    (venv / "lib").mkdir()
    (venv / "lib/big.bin").write_bytes(os.urandom(300_000))
    (cwd / "assets/hf").mkdir(parents=True)
    (cwd / "assets/hf/tokenizer.json").write_text("{}")
    return home, cwd, venv, py


def _paths(venv, cwd):
    return [("venv", str(venv)), ("asset", str(cwd / "assets"))]


def test_locate_maps_paths_to_the_working_dir_home_or_root():
    assert envsnap.locate("/h/w/assets", "asset", "/h", "/h/w") == envsnap.Item("cwd", "assets", "asset")
    assert envsnap.locate("/h/.supervise/venv", "venv", "/h", "/h/w") == envsnap.Item("home", ".supervise/venv", "venv")
    assert envsnap.locate("/data/tok", "asset", "/h", "/h/w") == envsnap.Item("abs", "data/tok", "asset")
    assert envsnap.Item("cwd", "assets", "asset").target("/h", "/other") == "/other/assets"


def test_refusal_names_what_differs():
    m = {"format": envsnap.FORMAT, "key": "k", "home": "/home/a", "machine": "x86_64"}
    assert envsnap.refusal(m, "/home/a", "x86_64", "k") is None
    assert "HOME /home/a" in envsnap.refusal(m, "/home/b", "x86_64", "k")
    assert "aarch64" in envsnap.refusal(m, "/home/a", "aarch64", "k")
    assert "format" in envsnap.refusal({**m, "format": 0}, "/home/a", "x86_64", "k")


def test_to_delete_keeps_the_newest_and_the_current():
    ms = {"a": {"created": 1}, "b": {"created": 3}, "c": {"created": 2}, "d": {"created": 0}}
    assert sorted(envsnap.to_delete(ms, 2, current="b")) == ["a", "d"]
    assert sorted(envsnap.to_delete(ms, 2, current="d")) == ["a", "c"]  # the one just published stays


def test_publish_then_restore_byte_for_byte_and_publish_once(node, s3_url, monkeypatch):
    home, cwd, venv, py = node
    monkeypatch.setattr(envsnap, "PART_BYTES", 100_000)  # several parts, uploaded and fetched in parallel
    store = Store(f"{s3_url}/_supervise/env")
    before = {"venv": _tree(venv), "py": _tree(py), "assets": _tree(cwd / "assets")}
    line = envsnap.publish(store, "k1", _paths(venv, cwd), str(home), str(cwd))
    assert line.startswith("snapshot k1 published:") and "parts" in line
    manifest = json.loads(store.cat("k1", envsnap.MANIFEST))
    assert [i["role"] for i in manifest["items"]] == ["python", "venv", "asset"]
    assert len(manifest["items"][1]["parts"]) >= 3
    assert envsnap.publish(store, "k1", _paths(venv, cwd), str(home), str(cwd)) == "snapshot k1 is already in the bucket"

    import shutil

    shutil.rmtree(home / ".local")
    shutil.rmtree(venv)
    shutil.rmtree(cwd / "assets")
    line = envsnap.restore(store, "k1", _paths(venv, cwd), str(home), str(cwd))
    assert line.startswith("restored from snapshot k1:")
    assert {"venv": _tree(venv), "py": _tree(py), "assets": _tree(cwd / "assets")} == before
    assert not list(home.rglob(".supervise-restore-*"))


def test_a_lost_conditional_create_removes_the_loser_s_parts(node, s3_url, monkeypatch):
    home, cwd, venv, _ = node
    store = Store(f"{s3_url}/_supervise/env")
    real = store.listdir
    monkeypatch.setattr(store, "listdir", lambda *parts: {} if parts == ("k1",) else real(*parts))  # both saw none
    assert "published" in envsnap.publish(store, "k1", _paths(venv, cwd), str(home), str(cwd))
    line = envsnap.publish(store, "k1", _paths(venv, cwd), str(home), str(cwd))
    assert line == "snapshot k1 was published by another node first"
    monkeypatch.undo()
    writers = [n for n, e in store.listdir("k1").items() if e.get("type") == "directory"]
    assert writers == [json.loads(store.cat("k1", envsnap.MANIFEST))["writer"]]


def test_missing_other_home_and_corrupt_snapshots_are_refused_with_one_line(node, s3_url, monkeypatch):
    home, cwd, venv, _ = node
    url = f"{s3_url}/_supervise/env"
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(Path(__file__).parents[2])}

    def restore(key: str, home_dir: Path = home) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "supervisor.store.envsnap", "restore", "--url", url, "--key", key,
                               "--venv", str(venv)], cwd=cwd, env={**env, "HOME": str(home_dir)},
                              capture_output=True, text=True, timeout=120)

    out = restore("k0")
    assert out.returncode == 1
    assert out.stderr.strip() == ("supervise setup: not restoring a snapshot: no snapshot for key k0 in the bucket; "
                                  "installing in full")
    # the store client itself cannot load (seen on Slurm: the snapshot tools half deleted under setup)
    broken = home.parent / "broken-s3fs"
    (broken / "s3fs").mkdir(parents=True)
    (broken / "s3fs/__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'aiosignal'\")\n")
    out = subprocess.run([sys.executable, "-m", "supervisor.store.envsnap", "restore", "--url", url, "--key", "k0",
                          "--venv", str(venv)], cwd=cwd, env={**env, "PYTHONPATH": f"{broken}:{env['PYTHONPATH']}"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "not restoring a snapshot: cannot open" in out.stderr and "aiosignal" in out.stderr, out.stderr
    store = Store(url)
    envsnap.publish(store, "k1", _paths(venv, cwd), str(home), str(cwd))
    out = restore("k2")
    assert out.returncode == 1 and "(it has k1: other setups)" in out.stderr
    other = home.parent / "other-home"
    other.mkdir()
    out = restore("k1", other)
    assert out.returncode == 1 and f"HOME {home}, this node's is {other}" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

    manifest = json.loads(store.cat("k1", envsnap.MANIFEST))
    part = manifest["items"][1]["parts"][0]
    store.put(b"flipped" + store.cat("k1", manifest["writer"], part["name"])[7:], "k1", manifest["writer"], part["name"])
    venv_before = _tree(venv)
    out = restore("k1")
    assert out.returncode == 1
    assert f"snapshot k1 is corrupt (part {part['name']} does not match the manifest" in out.stderr
    assert _tree(venv) == venv_before  # nothing unpacked over what was there
    assert not store.listdir("k1")  # deleted: the next full install publishes afresh


def test_only_the_newest_two_keys_stay(node, s3_url, monkeypatch):
    home, cwd, venv, _ = node
    store = Store(f"{s3_url}/_supervise/env")
    store.put(b"x", "notes", "readme.txt")  # not ours: never touched
    clock = iter(range(1000, 2000))
    monkeypatch.setattr(envsnap.time, "time", lambda: next(clock))
    for key in ("k1", "k2", "k3"):
        line = envsnap.publish(store, key, _paths(venv, cwd), str(home), str(cwd))
    assert line.endswith("older snapshots removed: k1")
    assert sorted(n for n, e in store.listdir().items()) == ["k2", "k3", "notes"]
    assert platform.machine() == json.loads(store.cat("k3", envsnap.MANIFEST))["machine"]


def test_a_node_that_finds_another_s_claim_uploads_nothing_unless_the_claim_is_stale(node, s3_url, monkeypatch):
    """The nodes of a job install at once; one uploads. A claim older than CLAIM_TTL_S is a
    publisher that vanished mid-upload (a preemption during setup): the next node takes over."""
    import time

    home, cwd, venv, _ = node
    store = Store(f"{s3_url}/_supervise/env")
    claim = {"writer": "node-a-1-x", "t": time.time()}
    assert store.create_exclusive(json.dumps(claim).encode(), "k1", envsnap.CLAIM)
    line = envsnap.publish(store, "k1", _paths(venv, cwd), str(home), str(cwd))
    assert line == "snapshot k1 is being published by node-a-1-x"
    assert list(store.listdir("k1")) == [envsnap.CLAIM]  # no parts, no manifest
    store.rm([store.path("k1", envsnap.CLAIM)])
    stale = {**claim, "t": time.time() - envsnap.CLAIM_TTL_S - 1}
    assert store.create_exclusive(json.dumps(stale).encode(), "k1", envsnap.CLAIM)
    assert envsnap.publish(store, "k1", _paths(venv, cwd), str(home), str(cwd)).startswith("snapshot k1 published:")
    assert json.loads(store.cat("k1", envsnap.CLAIM))["writer"] != "node-a-1-x"


def test_the_parts_of_a_publisher_that_vanished_are_removed_by_the_next_publish(node, s3_url):
    """A node preempted mid-upload leaves its claim and parts, never a manifest. Once the
    claim is stale, the next publish (of any key) removes them; a fresh claim is left alone."""
    import time

    home, cwd, venv, _ = node
    store = Store(f"{s3_url}/_supervise/env")
    for key, age in (("gone", envsnap.CLAIM_TTL_S + 1), ("busy", 0.0)):
        claim = {"writer": f"node-{key}", "t": time.time() - age}
        assert store.create_exclusive(json.dumps(claim).encode(), key, envsnap.CLAIM)
        store.put(b"half a venv", key, f"node-{key}", "venv-0000.part")
    store.put(b"x", "notes", "readme.txt")  # not ours: never touched
    line = envsnap.publish(store, "k1", _paths(venv, cwd), str(home), str(cwd))
    assert line.endswith("older snapshots removed: gone"), line
    assert sorted(store.listdir()) == ["busy", "k1", "notes"]
    assert list(store.listdir("busy", "node-busy")) == ["venv-0000.part"]


def test_a_failed_publish_drops_its_claim_and_says_why(node, s3_url):
    """tar failing mid-publish (here: an asset folder that went away) ends it with tar's own
    words; the parts and the claim go, so the next node that installs publishes."""
    home, cwd, venv, _ = node
    store = Store(f"{s3_url}/_supervise/env")
    paths = [("venv", str(venv)), ("asset", str(cwd / "gone"))]
    with pytest.raises(OSError, match="tar of .*gone exited 2: .*gone"):
        envsnap.publish(store, "k1", paths, str(home), str(cwd))
    assert not store.listdir("k1")
    assert envsnap.publish(store, "k1", _paths(venv, cwd), str(home), str(cwd)).startswith("snapshot k1 published:")
