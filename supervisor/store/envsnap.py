"""Environment snapshots: a node's setup result in the bucket, so a fresh node restores it in seconds.

After a full install, node rank 0 packs what setup made — the venv, the uv-managed
Python the venv runs on (when it lies in HOME), the recipe's assets — as one tar
stream per folder (GNU tar), cut into PART_BYTES parts hashed and uploaded in
parallel under `<env url>/<key>/<writer>/`, then publishes `<key>/manifest.json`
(sizes and SHA-256 of every part) with the store's conditional create
(`Store.create_exclusive`, as the catalog commits): two writers can never both
publish, and a loser deletes its own parts. Only the newest KEEP keys stay.

A fresh node with the same key (setup's fingerprint of everything it installs)
reads the manifest, fetches the parts with parallel ranged GETs
(`Store.iter_bytes`), checks each part's size and hash before its bytes reach
tar, unpacks beside each target and renames into place only when every part of
that folder checked out. A missing, partial or corrupt snapshot, another HOME or
another Python ABI is refused with one line (exit 1): setup then installs in
full. A corrupt one is deleted so that the next full install publishes afresh.

Runs on the node in the venv's Python (publish) or the system python3 with the
store's packages in a side folder (restore, before a venv exists): standard
library + `supervisor.store` only.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import posixpath
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from supervisor.store import retry
from supervisor.store.errors import StoreInputError, StoreUnreachable
from supervisor.store.fs import Store

FORMAT = 1
MANIFEST = "manifest.json"
CLAIM = "claim.json"  # the one node uploading a key: the others skip before reading a byte
PUBLISH_TRIES = 2  # a failed pack or upload (a file changed under tar, a store error) is tried once more
CLAIM_TTL_S = 1800.0  # a claim this old is a publisher that vanished (preempted mid-upload): taken over
KEY_FILE = ".supervise-setup-key"  # in each folder setup made: the fingerprint it was made for
PART_BYTES = 64 * 2**20
UPLOAD_PARALLEL = 8  # parts uploaded at once (memory: this many parts)
FETCH_PARTS = 4  # parts fetched at once, each as FETCH_RANGES ranged GETs
FETCH_RANGES = 4
KEEP = 2  # newest keys kept in the bucket
PREFIX = "supervise setup:"


class Unusable(Exception):
    """The snapshot cannot be used here; the message says why (one line)."""


class Corrupt(Unusable):
    """The snapshot's bytes do not match its manifest: it is deleted."""


@dataclass(frozen=True)
class Item:
    """One folder of the snapshot: where it lies (relative to HOME, the working directory or /)."""

    base: str  # home | cwd | abs
    rel: str
    role: str  # python | venv | asset

    def target(self, home: str, cwd: str) -> str:
        return os.path.normpath(os.path.join({"home": home, "cwd": cwd, "abs": "/"}[self.base], self.rel))


def locate(path: str, role: str, home: str, cwd: str) -> Item:
    """The item for an absolute `path`: under the working directory, else HOME, else absolute."""
    path = os.path.normpath(path)
    for base, root in (("cwd", cwd), ("home", home)):
        root = os.path.normpath(root)
        if path.startswith(root + os.sep):
            return Item(base, os.path.relpath(path, root), role)
    return Item("abs", path.lstrip("/"), role)


def venv_python(venv: str) -> tuple[str, str]:
    """(the base interpreter's bin folder from pyvenv.cfg, the venv's Python version)."""
    cfg = {}
    for line in Path(venv, "pyvenv.cfg").read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep:
            cfg[name.strip()] = value.strip()
    return cfg.get("home", ""), cfg.get("version_info") or cfg.get("version", "")


def python_root(bin_dir: str, home: str, venv: str) -> str | None:
    """The install folder of a venv's base interpreter when it lies in HOME outside the venv
    (uv's managed CPython: ~/.local/share/uv/python/cpython-3.11.x-.../bin), else None."""
    real = os.path.realpath(bin_dir)
    root = os.path.dirname(real)
    home = os.path.realpath(home)
    if real.startswith(home + os.sep) and not real.startswith(os.path.realpath(venv) + os.sep) and root != home:
        return root
    return None


def refusal(manifest: dict, home: str, machine: str, key: str) -> str | None:
    """Why this node cannot use the snapshot described by `manifest` (None: it can)."""
    if manifest.get("format") != FORMAT:
        return f"snapshot format {manifest.get('format')!r}, this setup reads {FORMAT}"
    if manifest.get("key") != key:
        return f"snapshot is for key {manifest.get('key')!r}, not {key}"
    if manifest.get("home") != home:
        return f"snapshot was made in HOME {manifest.get('home')}, this node's is {home} (a venv is not relocatable)"
    if manifest.get("machine") != machine:
        return f"snapshot was made on {manifest.get('machine')}, this node is {machine}"
    return None


def to_delete(manifests: dict[str, dict], keep: int, current: str) -> list[str]:
    """Keys beyond the newest `keep` (by publication time); never `current`."""
    order = sorted(manifests, key=lambda k: (k == current, manifests[k].get("created", 0)), reverse=True)
    return [k for k in order[keep:] if k != current]


# -- publish ------------------------------------------------------------------------


def _pack(store: Store, item: Item, target: str, folder: str) -> list[dict]:
    """Tar `target`, cut the stream into parts, hash and upload them UPLOAD_PARALLEL at a time."""
    name = f"{item.role}-{hashlib.sha256(item.rel.encode()).hexdigest()[:8]}"
    tar_said = tempfile.TemporaryFile()  # tar's warnings, for the error line (a pipe could fill and block it)
    tar = subprocess.Popen(["tar", "-C", os.path.dirname(target), "-cf", "-", os.path.basename(target)],
                           stdout=subprocess.PIPE, stderr=tar_said)
    slots = threading.Semaphore(UPLOAD_PARALLEL)
    parts, futures = [], []

    def upload(index: int, data: bytes) -> None:
        try:
            store.put(data, folder, f"{name}.{index:05d}")
        finally:
            slots.release()

    with ThreadPoolExecutor(max_workers=UPLOAD_PARALLEL) as pool:
        while True:
            slots.acquire()
            data = tar.stdout.read(PART_BYTES)
            if not data:
                slots.release()
                break
            parts.append({"name": f"{name}.{len(parts):05d}", "size": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
            futures.append(pool.submit(upload, len(parts) - 1, data))
        for f in futures:
            f.result()
    if tar.wait() != 0:
        tar_said.seek(0)
        said = tar_said.read().decode(errors="replace").strip().splitlines()
        raise OSError(f"tar of {target} exited {tar.returncode}" + (f": {said[0]}" if said else ""))  # the cause
    return parts


def publish(store: Store, key: str, paths: list[tuple[str, str]], home: str, cwd: str) -> str:
    """Pack and publish `paths` ((role, absolute path)) under `key`; returns one line saying what happened."""
    if store.listdir(key).get(MANIFEST):
        return f"snapshot {key} is already in the bucket"
    t0 = time.monotonic()
    items = [locate(p, role, home, cwd) for role, p in paths]
    venv = next((p for role, p in paths if role == "venv"), None)
    bin_dir, version = venv_python(venv) if venv else ("", "")
    root = python_root(bin_dir, home, venv) if venv else None
    if root:
        items.insert(0, locate(root, "python", home, cwd))
    writer = f"{platform.node()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if (busy := _claim(store, key, writer)) is not None:
        return busy
    folder = posixpath.join(key, writer)
    try:
        packed = [{**asdict(item), "parts": _pack(store, item, item.target(home, cwd), folder)} for item in items]
        manifest = {"format": FORMAT, "key": key, "created": time.time(), "writer": writer, "home": home,
                    "machine": platform.machine(), "python": {"version": version, "bin": bin_dir}, "items": packed}
        won = store.create_exclusive(json.dumps(manifest, indent=1).encode(), key, MANIFEST)
    except BaseException:
        _remove_folder(store, folder)
        _release(store, key, writer)  # else every node installs in full until the claim is stale
        raise
    if not won:
        _remove_folder(store, folder)
        return f"snapshot {key} was published by another node first"
    size = sum(p["size"] for item in packed for p in item["parts"])
    dropped = _retain(store, key)
    return (f"snapshot {key} published: {size / 2**20:.0f} MiB in {sum(len(i['parts']) for i in packed)} parts, "
            f"{time.monotonic() - t0:.1f} s" + (f"; older snapshots removed: {', '.join(dropped)}" if dropped else ""))


def _claim(store: Store, key: str, writer: str) -> str | None:
    """None when `writer` may upload `key`, else why not. The nodes of a job install at the
    same time, and setup's node rank is not reliable on Slurm (its setup has none), so every
    node that installed asks: the first conditional create wins, the others upload nothing."""
    claim = json.dumps({"writer": writer, "t": time.time()}).encode()
    if store.create_exclusive(claim, key, CLAIM):
        return None
    with contextlib.suppress(FileNotFoundError):
        store.cat(key, MANIFEST)
        return f"snapshot {key} was published by another node first"
    try:
        held = json.loads(store.cat(key, CLAIM))
    except (FileNotFoundError, ValueError):
        held = {}
    if time.time() - float(held.get("t", 0)) < CLAIM_TTL_S:
        return f"snapshot {key} is being published by {held.get('writer', 'another node')}"
    store.rm([store.path(key, CLAIM)])
    return None if store.create_exclusive(claim, key, CLAIM) else f"snapshot {key} is being published by another node"


def _release(store: Store, key: str, writer: str) -> None:
    """Drop `writer`'s claim on `key` (best effort: a claim left behind goes stale)."""
    with contextlib.suppress(FileNotFoundError, ValueError, StoreUnreachable, OSError):
        if json.loads(store.cat(key, CLAIM)).get("writer") == writer:
            store.rm([store.path(key, CLAIM)])


def _remove_folder(store: Store, *parts: str) -> None:
    """Delete every object under a snapshot folder (two levels: manifest, writers' parts)."""
    for name, entry in store.listdir(*parts).items():
        if entry.get("type") == "directory":
            _remove_folder(store, *parts, name)
        else:
            store.rm([store.path(*parts, name)])
    store.rmdir_if_empty(*parts)


def _retain(store: Store, current: str) -> list[str]:
    """Keep the newest KEEP published keys, and drop the parts of a publisher that vanished
    (its claim older than CLAIM_TTL_S, no manifest: up to a whole venv of orphaned parts).
    Folders with neither a manifest nor a claim of ours are left alone."""
    manifests, abandoned = {}, []
    for name, entry in store.listdir().items():
        if entry.get("type") != "directory":
            continue
        try:
            manifest = json.loads(store.cat(name, MANIFEST))
        except FileNotFoundError:
            if name != current and _stale_claim(store, name):
                abandoned.append(name)
            continue
        except ValueError:
            continue
        if isinstance(manifest, dict) and manifest.get("key") == name:
            manifests[name] = manifest
    dropped = to_delete(manifests, KEEP, current)
    for key in dropped:
        store.rm([store.path(key, MANIFEST)])  # unpublished first: no reader starts on a half-deleted one
    for key in dropped + abandoned:
        _remove_folder(store, key)
    return dropped + abandoned


def _stale_claim(store: Store, key: str) -> bool:
    try:
        claim = json.loads(store.cat(key, CLAIM))
        return time.time() - float(claim["t"]) >= CLAIM_TTL_S and "writer" in claim
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        return False


# -- restore ------------------------------------------------------------------------


def _fetch(store: Store, folder: str, part: dict) -> bytes:
    try:
        data = b"".join(store.iter_bytes(folder, part["name"], parallel=FETCH_RANGES))
    except FileNotFoundError:
        raise Corrupt(f"part {part['name']} is missing from the bucket") from None
    if len(data) != part["size"] or hashlib.sha256(data).hexdigest() != part["sha256"]:
        raise Corrupt(f"part {part['name']} does not match the manifest ({len(data)} bytes, "
                      f"{part['size']} expected, or another SHA-256)")
    return data


def _unpack(store: Store, folder: str, item: dict, target: str) -> None:
    """Fetch, check and untar one folder beside `target`; rename it into place only when whole."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".supervise-restore-{os.getpid()}-{os.path.basename(target)}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    tar = subprocess.Popen(["tar", "-C", staging, "--no-same-owner", "-xf", "-"], stdin=subprocess.PIPE)
    try:
        with ThreadPoolExecutor(max_workers=FETCH_PARTS) as pool:
            window = []
            parts = iter(item["parts"])
            for part in parts:
                window.append(pool.submit(_fetch, store, folder, part))
                if len(window) >= FETCH_PARTS:
                    tar.stdin.write(window.pop(0).result())
            for f in window:
                tar.stdin.write(f.result())
        tar.stdin.close()
        if tar.wait() != 0:
            raise Unusable(f"tar could not unpack {item['rel']} (exit {tar.returncode})")
        shutil.rmtree(target, ignore_errors=True)
        os.rename(os.path.join(staging, os.path.basename(target)), target)
    finally:
        if tar.poll() is None:
            tar.kill()
            tar.wait()
        shutil.rmtree(staging, ignore_errors=True)


def restore(store: Store, key: str, paths: list[tuple[str, str]], home: str, cwd: str) -> str:
    """Restore `paths` ((role, absolute path)) from the snapshot of `key`; raises Unusable."""
    t0 = time.monotonic()
    try:
        raw = store.cat(key, MANIFEST)
    except FileNotFoundError:
        others = sorted(n for n, e in store.listdir().items() if e.get("type") == "directory" and n != key)
        raise Unusable(f"no snapshot for key {key} in the bucket"
                       + (f" (it has {', '.join(others)}: other setups)" if others else "")) from None
    try:
        manifest = json.loads(raw)
        items = [(Item(i["base"], i["rel"], i["role"]), i) for i in manifest["items"]]
    except (ValueError, KeyError, TypeError) as err:
        raise Corrupt(f"unreadable manifest ({err})") from None
    why = refusal(manifest, home, platform.machine(), key)
    if why:
        raise Unusable(why)
    have = {(i.base, i.rel) for i, _ in items}
    wanted = [locate(p, role, home, cwd) for role, p in paths]
    lacking = [w.rel for w in wanted if (w.base, w.rel) not in have]
    if lacking:
        raise Unusable(f"snapshot {key} lacks {', '.join(lacking)}")
    todo = [(i, raw_item) for i, raw_item in items if (i.base, i.rel) in {(w.base, w.rel) for w in wanted}
            or (i.role == "python" and not os.path.exists(i.target(home, cwd)))]
    python_bin = manifest.get("python", {}).get("bin", "")
    if "venv" in {i.role for i, _ in todo} and not any(i.role == "python" for i, _ in items):
        _check_base_python(python_bin, manifest.get("python", {}).get("version", ""))
    folder = posixpath.join(key, manifest.get("writer", ""))
    size = 0
    for item, raw_item in sorted(todo, key=lambda pair: pair[0].role != "python"):
        _unpack(store, folder, raw_item, item.target(home, cwd))
        size += sum(p["size"] for p in raw_item["parts"])
    return f"restored from snapshot {key}: {size / 2**20:.0f} MiB in {time.monotonic() - t0:.1f} s"


def _check_base_python(bin_dir: str, version: str) -> None:
    """A venv whose interpreter is not in the snapshot needs the same one on this node."""
    exe = os.path.join(bin_dir, "python3")
    try:
        out = subprocess.run([exe, "-c", "import sys; print('.'.join(map(str, sys.version_info[:3])))"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    except OSError:
        raise Unusable(f"the snapshot's venv runs on {exe}, which this node lacks") from None
    if not version.startswith(out) or not out:
        raise Unusable(f"the snapshot's venv was made with Python {version}; {exe} here is {out or 'broken'}")


# -- command line -------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor.store.envsnap", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["publish", "restore"])
    parser.add_argument("--url", required=True, help="the snapshots' folder (<checkpoints>/_supervise/env)")
    parser.add_argument("--key", required=True, help="setup's fingerprint")
    parser.add_argument("--venv", help="the venv folder")
    parser.add_argument("--asset", action="append", default=[], help="an asset folder (repeatable)")
    opts = parser.parse_args(argv)
    home, cwd = os.path.expanduser("~"), os.getcwd()
    paths = ([("venv", os.path.abspath(opts.venv))] if opts.venv else []) + [
        ("asset", os.path.abspath(a)) for a in opts.asset]
    if opts.action == "publish":  # never fails setup
        sys.dont_write_bytecode = True  # this runs from the venv it packs: nothing may land in it under tar
        for attempt in range(1, PUBLISH_TRIES + 1):
            try:
                print(f"{PREFIX} {publish(Store(opts.url), opts.key, paths, home, cwd)}", flush=True)
                break
            except (StoreInputError, StoreUnreachable, OSError) as err:
                then = "trying again" if attempt < PUBLISH_TRIES else "fresh nodes install in full"
                print(f"{PREFIX} warning: snapshot not published ({err}); {then}", file=sys.stderr, flush=True)
        return 0
    try:  # a store client that cannot load (StoreInputError) is one line too, then a full install
        store = Store(opts.url, policy=retry.BRIEF)  # unreachable: answer in seconds, install in full
        print(f"{PREFIX} {restore(store, opts.key, paths, home, cwd)}", flush=True)
        return 0
    except Corrupt as err:
        print(f"{PREFIX} snapshot {opts.key} is corrupt ({err}): deleted; installing in full", file=sys.stderr)
        try:
            store.rm([store.path(opts.key, MANIFEST)])
            _remove_folder(store, opts.key)
        except (StoreInputError, StoreUnreachable, OSError):
            pass
    except Unusable as err:
        print(f"{PREFIX} not restoring a snapshot: {err}; installing in full", file=sys.stderr)
    except (StoreInputError, StoreUnreachable, OSError) as err:
        print(f"{PREFIX} not restoring a snapshot: {err}; installing in full", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
