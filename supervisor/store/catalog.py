"""The verified checkpoint catalog: commit, list, latest-with-fallback, verify, quarantine, prune.

A checkpoint is resumable only when it provably is: `step-N/_COMMIT.json` was
created (conditionally: one writer wins) after every file `.metadata` names was
seen through the store API with its full size, and it still matches (docs/store.md
describes the protocol); the pure rules live in manifest.py.

The `LATEST` pointer is raised only *after* a step's commit marker was
created, so it never names a step that was not committed. A crash between
the two leaves a committed step above the pointer: `latest` therefore looks
at the (few) step folders above the pointer first, then at the pointer's
step, and scans older steps only when that one fails to verify.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import pickle
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from supervisor.contract import layout
from supervisor.store import manifest as mf
from supervisor.store import retry
from supervisor.store.errors import (  # re-exported: the catalog's error vocabulary
    AlreadyCommitted,
    CheckpointInvalid,
    IncompleteCheckpoint,
    StoreInputError,
    StoreUnreachable,
)
from supervisor.store.fs import Store

__all__ = [
    "Catalog", "StepInfo", "Latest", "PruneResult",
    "AlreadyCommitted", "CheckpointInvalid", "IncompleteCheckpoint", "StoreInputError", "StoreUnreachable",
]  # fmt: skip

log = logging.getLogger("supervisor.store")

DEEP_OBJECTS = 2  # objects re-hashed at once; each is read as parallel ranged GETs (Store.iter_bytes)
STALE_UPLOAD_S = 3600.0  # a multipart upload this old under the catalog is a killed writer's leftover


@dataclass
class StepInfo:
    step: int
    path: str
    state: str
    reason: str = ""
    manifest: dict | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.state in (mf.COMMITTED, mf.LEGACY)

    def to_json(self) -> dict:
        out = {"step": self.step, "path": self.path, "state": self.state, "reason": self.reason}
        if self.manifest:
            out["committed_at"] = self.manifest.get("created")
            out["bytes"] = sum(int(o["size"]) for o in self.manifest["objects"].values())
        return out


@dataclass
class Latest:
    step: int | None
    path: str | None = None
    state: str | None = None
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def describe(self) -> str:
        skipped = "; ".join(f"step {s} {r}" for s, r in self.skipped)
        head = f"resuming from step {self.step}" if self.step is not None else "no valid checkpoint"
        if self.state == mf.LEGACY:
            head += " (legacy: no commit manifest, structurally complete)"
        return f"{head}; {skipped}" if skipped else head

    def to_json(self) -> dict:
        """Exactly the CLI contract: {"step": N, "path": ..., "state": ...} or {"step": null}."""
        if self.step is None:
            return {"step": None}
        return {"step": self.step, "path": self.path, "state": self.state}


@dataclass
class PruneResult:
    anchor: int | None
    delete: list[int]
    reason: str
    dry_run: bool


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _versions() -> dict[str, str]:
    from importlib import metadata

    from supervisor import DIST  # supervise's distribution name (`supervise` on PyPI is another project)

    out = {}
    for key, dist in (("torch", "torch"), ("torchtitan", "torchtitan"), ("supervise", DIST)):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[key] = metadata.version(dist)
    return out


def _load_metadata(data: bytes):
    """DCP `.metadata` is a pickled `torch.distributed.checkpoint.Metadata` (as FileSystemReader reads it)."""
    import torch.distributed.checkpoint  # noqa: F401  (classes the pickle refers to)

    try:
        metadata = pickle.loads(data)
    except Exception as err:
        raise ValueError(f"unreadable {layout.METADATA} ({type(err).__name__})") from err
    if getattr(metadata, "storage_data", None) is None:
        raise ValueError(f"{layout.METADATA} has no storage_data (not a file-system DCP save)")
    return metadata


class Catalog:
    """The `step-N` folders under one URL (e.g. `s3://bucket/run1/checkpoint`)."""

    def __init__(self, url: str, policy: retry.Policy = retry.PATIENT):
        self.url = str(url).rstrip("/")
        self.store = Store(self.url, policy)

    # -- discovery ------------------------------------------------------------
    def steps(self) -> list[int]:
        """Step numbers of folders named exactly `step-<int>` (anything else is ignored)."""
        listing = self.store.listdir()
        if not listing:
            self.store.check_container()
        return sorted(
            s for name, e in listing.items() if (s := layout.parse_step(name)) is not None and e.get("type") == "directory"
        )

    def path(self, step: int) -> str:
        return self.store.url_of(layout.step_dir(step))

    def _pointer(self) -> int | None:
        try:
            data = json.loads(self.store.cat(layout.POINTER))
            return int(data["step"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable %s pointer in %s", layout.POINTER, self.url)
            return None

    def _raise_pointer(self, step: int) -> None:
        current = self._pointer()
        if current is None or current < step:
            self.store.put(json.dumps({"step": step, "updated": _now()}).encode(), layout.POINTER)

    # -- inspection -----------------------------------------------------------
    def inspect(self, step: int, deep: bool = False) -> StepInfo:
        """The state of one step folder, with a one-line reason when it is not usable."""
        d = layout.step_dir(step)
        listing = self.store.listdir(d)
        info = StepInfo(step, self.path(step), mf.INCOMPLETE)
        if not listing:
            info.reason = "empty or missing folder"
            return info
        if layout.QUARANTINE in listing:
            info.state, info.reason = mf.QUARANTINED, self._quarantine_reason(step)
            return info
        if layout.COMMIT in listing:
            try:
                info.manifest = mf.parse_manifest(self.store.cat(d, layout.COMMIT), step)
            except ValueError as err:
                info.state, info.reason = mf.CORRUPT, str(err)
                return info
            problems = mf.manifest_problems(info.manifest, listing)
            rehash = None if deep else mf.etag_changed(info.manifest, listing)
            if not problems and (deep or rehash):
                objects = info.manifest["objects"]
                problems = self._deep_problems(d, objects if deep else {n: objects[n] for n in rehash})
            info.state = mf.CORRUPT if problems else mf.COMMITTED
            info.reason = "; ".join(problems)
            return info
        problems = self._structure(d, listing)[0]
        if not problems and deep:
            records = {n: {"size": int(e.get("size") or 0), **({"etag": mf.etag_of(e)} if mf.etag_of(e) else {})}
                       for n, e in mf.checkpoint_files(listing).items()}  # fmt: skip
            problems = self._deep_problems(d, records)
        info.state = mf.INCOMPLETE if problems else mf.LEGACY
        info.reason = "; ".join(problems) or "no commit manifest"
        return info

    def _structure(self, d: str, listing: dict) -> tuple[list[str], object | None]:
        """(problems, the parsed `.metadata`)."""
        if layout.METADATA not in listing:
            return [f"{layout.METADATA} missing"], None
        try:
            metadata = _load_metadata(self.store.cat(d, layout.METADATA))
        except ValueError as err:
            return [str(err)], None
        return mf.structural_problems(mf.required_sizes(metadata), listing), metadata

    def _written(self, d: str, listing: dict) -> tuple[dict | None, str | None]:
        """(the writers' record of the save, or None; why it cannot be used).
        The record lists itself too, as the bytes just read, so the manifest
        hashes every object it covers."""
        if layout.WRITTEN not in listing:
            return None, f"{layout.WRITTEN} missing"
        try:
            data = self.store.cat(d, layout.WRITTEN)
            record = mf.parse_written(data)
        except FileNotFoundError:
            return None, f"{layout.WRITTEN} missing"
        except ValueError as err:
            return None, str(err)
        record["files"][layout.WRITTEN] = {"size": len(data), "md5": hashlib.md5(data).hexdigest()}
        return record, None

    def _commit_problems(self, d: str, listing: dict, written: bool) -> tuple[list[str], dict | None]:
        """What keeps the listed step from being committed now, and the writers' record.

        Without a record (plain TorchTitan, a hand commit of one) the step must be
        structurally complete; with one (required when `written`: the trainer's
        own save), every object must also be exactly the one this save wrote."""
        if not listing:
            return ["folder missing"], None
        problems, metadata = self._structure(d, listing)
        if problems:
            return problems, None
        record, why = self._written(d, listing)
        if record is None:
            return ([why] if written else []), None
        meta = getattr(metadata, "storage_meta", None)
        return mf.stale_problems(record, listing, getattr(meta, "save_id", None)), record

    def _deep_problems(self, d: str, records: dict[str, dict], layout: Store | None = None,
                       md5s: dict[str, str] | None = None) -> list[str]:
        """Re-hash the objects' bytes (deep verify, a copy, a quarantine decision):
        each object as parallel ranged GETs, DEEP_OBJECTS objects at a time.
        `layout`: the store whose multipart ETags the records hold (a copy checks its
        bytes against the original's), for their part sizes. `md5s` receives the
        MD5 of every object that matched."""

        def check(item: tuple[str, dict]) -> list[str]:
            name, record = item
            parts = mf.multipart_count(record)
            check = mf.ContentCheck(name, record, (layout or self.store).part_sizes(parts, d, name) if parts else None)
            try:
                for chunk in self.store.iter_bytes(d, name):
                    check.update(chunk)
            except FileNotFoundError:
                return [f"{name} missing"]
            problems = check.problems()
            if not problems and md5s is not None:
                md5s[name] = check.md5()
            return problems

        with ThreadPoolExecutor(max_workers=DEEP_OBJECTS) as pool:
            return [p for found in pool.map(check, sorted(records.items())) for p in found]

    def _quarantine_reason(self, step: int) -> str:
        try:
            return json.loads(self.store.cat(layout.step_dir(step), layout.QUARANTINE)).get("reason", "quarantined")
        except (FileNotFoundError, ValueError, AttributeError):
            return "quarantined"

    def list(self) -> list[StepInfo]:
        steps = self.steps()
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(self.inspect, steps))

    def verify(self, step: int, deep: bool = False) -> StepInfo:
        return self.inspect(step, deep=deep)

    # -- commit ---------------------------------------------------------------
    def commit(self, step: int, *, world_size: int | None = None, writer: str | None = None, wait_s: float = 0.0,
               written: bool = False) -> dict:
        """Write `step-N/_COMMIT.json` once every file `.metadata` names is complete.

        Costs a listing and two small reads, never the shards' bytes: their MD5s
        come from the writers' record (`_WRITTEN.json`, supervisor.titan.hashing)
        when the save left one, else from the store where it keeps a plain MD5;
        otherwise the step is committed on sizes and ETags and the manifest says so.
        `written`: the save was ours, so its record must be there and every object
        must be the one it wrote (a stale shard of the same name waits, then fails).

        `wait_s` bounds a poll for objects that are not there yet (a cached mount
        uploads after `save` returns); the bound restarts while the listing changes.
        Raises IncompleteCheckpoint with the reason, or AlreadyCommitted if another writer won.
        """
        d = layout.step_dir(step)
        wait_s = max(0.0, wait_s)
        deadline, seen = time.monotonic() + wait_s, None
        while True:
            listing = self.store.listdir(d)
            if layout.COMMIT in listing:
                raise AlreadyCommitted(f"step {step} is already committed ({self.path(step)})")
            if layout.QUARANTINE in listing:
                raise CheckpointInvalid(f"step {step} is quarantined: {self._quarantine_reason(step)}")
            problems, record = self._commit_problems(d, listing, written)
            if not problems or time.monotonic() >= deadline:
                break
            progress = sorted((n, e.get("size"), str(mf.modified_at(e))) for n, e in listing.items())
            if progress != seen:  # uploads are landing: give them the full wait again
                seen, deadline = progress, time.monotonic() + wait_s
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        if problems:
            raise IncompleteCheckpoint(f"step {step} is incomplete, not committed: {'; '.join(problems)}")
        files = mf.checkpoint_files(listing)
        if record is not None:
            files = {n: e for n, e in files.items() if n in record["files"]}
        md5s = {n: md5 for n, e in files.items() if (md5 := mf.content_md5(e))}
        md5s.update({n: f["md5"] for n, f in (record or {"files": {}})["files"].items()})
        manifest = mf.build_manifest(
            step, files,
            world_size=world_size or mf.infer_world_size(files),
            writer=writer or f"{socket.gethostname()}:{os.getpid()}",
            versions=_versions(), created=_now(), md5s=md5s, hashes="writer" if record is not None else "store",
        )  # fmt: skip
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        if not self.store.create_exclusive(data, d, layout.COMMIT) and not self._is_ours(d, data):
            raise AlreadyCommitted(f"step {step} is already committed ({self.path(step)}): another writer won")
        self._raise_pointer(step)  # only after the marker exists
        log.info("committed step %d (%d objects) at %s", step, len(manifest["objects"]), self.path(step))
        return manifest

    def set_aside(self, step: int) -> tuple[str, list[str]] | None:
        """Before a new save into an existing `step-N`: move its old marker, `.metadata`
        and writers' record (for a quarantined step, all its files: evidence) into
        `step-N/_superseded/<time>/`, so the new save is committed on its own and
        never mistaken for the old one. Nothing is deleted. Returns (where, names)."""
        d = layout.step_dir(step)
        listing = self.store.listdir(d)
        markers = [n for n in (layout.COMMIT, layout.QUARANTINE) if n in listing]
        # .metadata and the writers' record go too: until the new save writes its own,
        # a mix of old and new shards can be neither loaded nor committed as the old save
        names = markers + (sorted(mf.checkpoint_files(listing)) if layout.QUARANTINE in listing
                           else [n for n in (layout.METADATA, layout.WRITTEN) if n in listing])
        if not names:
            return None
        where = f"{layout.SUPERSEDED}/{_now().replace(':', '')}"
        for name in names:  # the commit marker first: from here on the step is uncommitted
            self.store.move((d, name), (d, where, name))
        return f"{self.path(step)}/{where}", names

    def _is_ours(self, d: str, data: bytes) -> bool:
        """A retried create whose first attempt landed (response lost) finds its own marker."""
        try:
            return self.store.cat(d, layout.COMMIT) == data
        except FileNotFoundError:
            return False

    def prove_conditional_create(self) -> None:
        """The canary run at every start: create one object twice under the catalog;
        the second create must be refused, or two writers could both commit a step.
        Raises StoreInputError naming the store (StoreUnreachable if it cannot be reached)."""
        if not self.store.remote:
            return  # hard links: atomic on every local file system
        name = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"
        target = self.store.path(layout.CANARY_DIR, name)
        # A failing first create is the answer: cleaning up after it would only retry
        # against the same broken store and report the cleanup's error instead.
        first = self.store.create_exclusive(b"first", layout.CANARY_DIR, name)
        try:
            second = self.store.create_exclusive(b"second", layout.CANARY_DIR, name)
        finally:
            self.store.rm([target])
            self.store.rmdir_if_empty(layout.CANARY_DIR)
        if not first or second:
            raise StoreInputError(
                f"the store behind {self.url} does not enforce conditional create (a second exclusive create of "
                f"{layout.CANARY_DIR}/{name} {'succeeded' if second else 'was refused before any create'}): two writers "
                "could both commit a step. Use a store that honours If-None-Match: * (AWS S3, GCS, SeaweedFS, "
                "recent MinIO/R2) for checkpoints"
            )

    # -- latest ---------------------------------------------------------------
    def latest(self, deep: bool = False) -> Latest:
        """The highest step that verifies; failing committed steps are quarantined and skipped.

        With a `LATEST` pointer (a supervised run) only committed steps count;
        without one (plain TorchTitan output) structurally complete legacy
        saves are accepted too.
        """
        pointer = self._pointer()
        skipped: list[tuple[int, str]] = []
        steps = self.steps()
        # Above the pointer: saves in progress, or a commit whose pointer update was lost.
        order = [s for s in reversed(steps) if pointer is None or s > pointer]
        if pointer is not None:
            order += [pointer] + [s for s in reversed(steps) if s < pointer]
        for step in order:
            info = self._consider(step, deep, skipped, supervised=pointer is not None)
            if info is not None:
                return Latest(info.step, info.path, info.state, skipped)
        return Latest(None, skipped=skipped)

    def _consider(self, step: int, deep: bool, skipped: list, *, supervised: bool) -> StepInfo | None:
        info = self.inspect(step, deep=deep)
        if info.state == mf.COMMITTED or (info.state == mf.LEGACY and not supervised):
            return info
        if info.state == mf.CORRUPT:
            self.quarantine(step, info.reason)
            skipped.append((step, f"quarantined: {info.reason}"))
        elif info.state == mf.LEGACY:
            skipped.append((step, "not committed (this run commits its checkpoints)"))
        else:
            skipped.append((step, f"{info.state}: {info.reason}"))
        return None

    def quarantine(self, step: int, reason: str) -> None:
        """Mark a step unusable (a marker object next to it); nothing is deleted."""
        body = json.dumps({"step": step, "reason": reason, "time": _now(), "by": socket.gethostname()}).encode()
        self.store.put(body, layout.step_dir(step), layout.QUARANTINE)
        log.warning("quarantined step %d: %s", step, reason)

    # -- copies ---------------------------------------------------------------
    def copy_to(self, dst: "Catalog", steps: list[int] | None = None) -> list[int]:
        """Copy committed steps (all, or `steps`) with their manifests to `dst`, each
        deep-verified there before its marker is created. Same store type: server-side
        copy; else the bytes are streamed through this process."""
        wanted = steps if steps is not None else [i.step for i in self.list() if i.state == mf.COMMITTED]
        copied = []
        for step in wanted:
            info = self.inspect(step)
            if info.state != mf.COMMITTED:
                raise CheckpointInvalid(f"step {step} is {info.state} at {self.url}, not copied: {info.reason}")
            d = layout.step_dir(step)
            if layout.COMMIT in dst.store.listdir(d):
                raise AlreadyCommitted(f"step {step} is already committed at {dst.url}: nothing copied")
            for name in sorted(info.manifest["objects"]):
                self._copy_object(dst, d, name)
            # the copy's bytes against the original's record (its md5s, else its ETags and part sizes)
            md5s: dict[str, str] = {}
            problems = dst._deep_problems(d, info.manifest["objects"], layout=self.store, md5s=md5s)
            if problems:
                raise CheckpointInvalid(f"step {step} copied to {dst.url} does not verify: {'; '.join(problems)}")
            manifest = mf.rebased(info.manifest, dst.store.listdir(d), md5s, copied_from=self.path(step), copied=_now())
            data = json.dumps(manifest, indent=1, sort_keys=True).encode()
            if not dst.store.create_exclusive(data, d, layout.COMMIT):
                raise AlreadyCommitted(f"step {step} was committed at {dst.url} by another writer during the copy")
            dst._raise_pointer(step)
            copied.append(step)
            log.info("copied step %d to %s", step, dst.path(step))
        return copied

    def _copy_object(self, dst: "Catalog", d: str, name: str) -> None:
        src_path, dst_path = self.store.path(d, name), dst.store.path(d, name)
        if type(self.store.fs) is type(dst.store.fs) and self.store.remote == dst.store.remote:
            self.store._call("copy", self.store.fs.copy, src_path, dst_path)
            return

        def stream():
            with dst.store.fs.open(dst_path, "wb") as out:
                for chunk in self.store.iter_bytes(d, name):
                    out.write(chunk)

        dst.store._call("write", stream)

    # -- retention ------------------------------------------------------------
    def prune(self, keep: int, pinned=(), dry_run: bool = True) -> PruneResult:
        """Delete old committed checkpoints beyond the newest `keep` (see manifest.prune_plan)."""
        infos = {i.step: i for i in self.list()}
        retainable = (mf.COMMITTED,) if self._pointer() is not None else (mf.COMMITTED, mf.LEGACY)
        anchor, delete, reason = mf.prune_plan({s: i.state for s, i in infos.items()}, keep, pinned, retainable=retainable)
        if anchor is not None and not dry_run:
            # The anchor was verified by list() just now; re-check before deleting anything older.
            fresh = self.inspect(anchor)
            if not fresh.ok:
                return PruneResult(None, [], f"newest checkpoint step {anchor} no longer verifies: nothing deleted", dry_run)
            for step in delete:
                self._delete_step(step)
        aborted = self.store.abort_stale_uploads(STALE_UPLOAD_S, dry_run=dry_run)
        if aborted:
            reason += f"; {'aborted' if not dry_run else 'would abort'} {len(aborted)} multipart upload(s) older than 1 h"
        return PruneResult(anchor, delete, reason, dry_run)

    def _delete_step(self, step: int) -> None:
        """Marker first, so a crash mid-delete leaves an *uncommitted* folder, never a torn committed one."""
        d = layout.step_dir(step)
        listing = self.store.listdir(d)
        first = [n for n in (layout.COMMIT, layout.METADATA) if n in listing]
        rest = [n for n, e in listing.items() if n not in first and e.get("type") != "directory"]
        self.store.rm([self.store.path(d, n) for n in first + rest])
        self.store.rmdir_if_empty(d)
        log.info("pruned step %d", step)

