"""Pure logic of the commit protocol: manifests, checks, retention (names: contract.layout).

No I/O here: every function takes listings / parsed objects and returns data,
so the rules that decide what is safe to resume from are tested without a store.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from dataclasses import dataclass, field

from supervisor.contract.layout import COMMIT, METADATA, QUARANTINE, WRITTEN

WRITTEN_FORMAT = "supervise.written/1"
CLOCK_TOLERANCE_S = 2.0  # store vs writer clocks, and listings that give whole seconds
FORMAT = "supervise.commit/1"

COMMITTED, LEGACY, INCOMPLETE, CORRUPT, QUARANTINED = "committed", "legacy", "incomplete", "corrupt", "quarantined"


def _label(name: str) -> str:
    return f"shard {name}" if name.endswith(".distcp") else name


def required_sizes(metadata) -> dict[str, int]:
    """File -> minimum size implied by a DCP `Metadata` (max offset+length of its entries)."""
    sizes: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), end)
    return sizes


def structural_problems(required: dict[str, int], listing: dict[str, dict]) -> list[str]:
    """What keeps a DCP save from being loadable: a named file missing or too short."""
    problems = []
    for name, need in sorted(required.items()):
        entry = listing.get(name)
        if entry is None:
            problems.append(f"{_label(name)} missing")
        elif int(entry.get("size") or 0) < need:
            problems.append(f"{_label(name)} truncated ({entry.get('size')} of {need} bytes)")
    return problems


def etag_of(entry: dict) -> str | None:
    tag = entry.get("ETag") or entry.get("etag")
    return tag.strip('"') if tag else None


_HEX_MD5 = re.compile(r"^[0-9a-f]{32}$")


def content_md5(entry: dict) -> str | None:
    """The object's MD5 (hex) as the store reports it, when it reports one:
    GCS's `md5Hash` (base64), or an S3 ETag that is a plain MD5 (single-part
    upload; SSE-KMS/SSE-C ETags are not). None for multipart ETags and the
    like: a commit never reads bytes back, so those get their MD5 from the
    writers' record (`WRITTEN`) or none at all."""
    b64 = entry.get("md5Hash")
    if b64:
        try:
            return base64.b64decode(b64).hex()
        except (binascii.Error, ValueError):
            return None
    tag = (etag_of(entry) or "").lower()
    return tag if _HEX_MD5.match(tag) else None


def modified_at(entry: dict) -> float | None:
    """When the store says the object was written (epoch seconds), if it says:
    S3's LastModified, GCS's `updated`, a local file's mtime."""
    import datetime as dt

    value = entry.get("LastModified") or entry.get("updated") or entry.get("mtime")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()
    return None


def written_record(files: dict[str, dict], *, save_id: str, started: float, finished: float) -> dict:
    """The writers' record of one save: {file: {size, md5}}, the DCP save id, and when it started."""
    return {"format": WRITTEN_FORMAT, "save_id": save_id, "started": started, "finished": finished,
            "files": {name: {"size": int(f["size"]), "md5": str(f["md5"])} for name, f in sorted(files.items())}}


def parse_written(data: bytes) -> dict:
    """Raises ValueError with a one-line reason if the record cannot be used."""
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"unreadable {WRITTEN} ({err})") from err
    if not isinstance(record, dict) or record.get("format") != WRITTEN_FORMAT or not isinstance(record.get("files"), dict):
        raise ValueError(f"unknown {WRITTEN} format")
    return record


def stale_problems(record: dict, listing: dict[str, dict], metadata_save_id: str | None) -> list[str]:
    """What keeps the listed objects from being exactly the ones this save wrote,
    judged without reading them: the record and `.metadata` are of one save (its
    id), every file the writers wrote is there with the size they wrote, none
    is older than the save's start (a shard of the same name from an earlier
    save of this step), and where the store keeps a plain MD5 it is theirs."""
    if metadata_save_id is not None and record.get("save_id") != metadata_save_id:
        return [f"{METADATA} and {WRITTEN} are of different saves (one is left from an earlier save of this step)"]
    problems = []
    since = float(record.get("started") or 0) - CLOCK_TOLERANCE_S
    for name, want in sorted(record["files"].items()):
        entry = listing.get(name)
        if entry is None:
            problems.append(f"{_label(name)} missing")
            continue
        size, written = int(entry.get("size") or 0), int(want["size"])
        when = modified_at(entry)
        if size != written:
            problems.append(f"{_label(name)} is {size} bytes, this save wrote {written} (not this save's object yet)")
        elif when is not None and when < since:
            problems.append(f"{_label(name)} is older than this save (an earlier save's object of the same name)")
        elif content_md5(entry) not in (None, want["md5"]):
            problems.append(f"{_label(name)} has another MD5 than this save wrote (not this save's object)")
    return problems


def checkpoint_files(listing: dict[str, dict]) -> dict[str, dict]:
    """The objects a manifest covers: every file of the step folder but our own markers/temp files."""
    return {
        name: entry
        for name, entry in listing.items()
        if entry.get("type") != "directory"
        and name not in (COMMIT, QUARANTINE)
        and not (name.startswith(f".{COMMIT}.") and name.endswith(".tmp"))
    }


def build_manifest(
    step: int,
    listing: dict[str, dict],
    *,
    world_size: int | None,
    writer: str | None,
    versions: dict[str, str],
    created: str,
    md5s: dict[str, str] | None = None,
    hashes: str = "store",
) -> dict:
    """`hashes` says where the md5s come from: "writer" (hashed while written:
    supervisor.titan.hashing) or "store" (what the store reports where it keeps a
    plain MD5). The manifest's `hashes` also says when only some objects, or none,
    have one: those are committed on sizes and ETags."""
    objects = {}
    for name, entry in sorted(checkpoint_files(listing).items()):
        record = {"size": int(entry.get("size") or 0)}
        if etag_of(entry):
            record["etag"] = etag_of(entry)
        if md5s and name in md5s:
            record["md5"] = md5s[name]
        objects[name] = record
    return {
        "format": FORMAT,
        "step": step,
        "world_size": world_size,
        "writer": writer,
        "created": created,
        "versions": versions,
        "hashes": _hashes_note(hashes, sum("md5" in o for o in objects.values()), len(objects)),
        "objects": objects,
    }


def _hashes_note(source: str, hashed: int, total: int) -> str:
    if hashed and hashed == total:
        return source
    if not hashed:
        return "none: sizes and ETags"
    return f"{source} for {hashed} of {total} objects; sizes and ETags for the rest"


def infer_world_size(names) -> int | None:
    ranks = [int(m.group(1)) for n in names if (m := re.match(r"^__(\d+)_\d+\.distcp$", n))]
    return max(ranks) + 1 if ranks else None


def parse_manifest(data: bytes, step: int) -> dict:
    """Raises ValueError with a one-line reason if the manifest cannot be trusted."""
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"unreadable {COMMIT} ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"unknown {COMMIT} format {manifest.get('format') if isinstance(manifest, dict) else None!r}")
    if manifest.get("step") != step:
        raise ValueError(f"{COMMIT} names step {manifest.get('step')}, folder is step {step}")
    if not isinstance(manifest.get("objects"), dict) or METADATA not in manifest["objects"]:
        raise ValueError(f"{COMMIT} lists no {METADATA}")
    return manifest


def manifest_problems(manifest: dict, listing: dict[str, dict]) -> list[str]:
    """Shallow verification: every object still there with the recorded size.
    An ETag that changed at the same size is not a problem by itself (a copy
    or re-upload changes it): `etag_changed` names those for a re-hash."""
    problems = []
    for name, record in sorted(manifest["objects"].items()):
        entry = listing.get(name)
        if entry is None:
            problems.append(f"{_label(name)} missing")
            continue
        size, want = int(entry.get("size") or 0), int(record["size"])
        if size < want:
            problems.append(f"{_label(name)} truncated ({size} of {want} bytes)")
        elif size != want:
            problems.append(f"{_label(name)} size changed ({size}, committed {want} bytes)")
    return problems


def etag_changed(manifest: dict, listing: dict[str, dict]) -> list[str]:
    """Objects whose ETag differs from the commit's at the same size: only their bytes can tell."""
    return sorted(
        name
        for name, record in manifest["objects"].items()
        if name in listing and record.get("etag") and etag_of(listing[name]) and etag_of(listing[name]) != record["etag"]
    )


def rebased(manifest: dict, listing: dict[str, dict], md5s: dict[str, str] | None = None, **extra) -> dict:
    """The same manifest for a copy of the step: the copy's ETags, the original's md5s.
    `md5s`: hashes the copy took of the objects the original had none for (their
    bytes matched the original's ETags), so the copy's own ETags, which a store may
    compute its own way for a copied object, are never all that vouches for them."""
    objects, added = {}, 0
    for name, record in manifest["objects"].items():
        record = {k: v for k, v in record.items() if k != "etag"}
        if etag_of(listing.get(name, {})):
            record["etag"] = etag_of(listing[name])
        if "md5" not in record and md5s and name in md5s:
            record["md5"], added = md5s[name], added + 1
        objects[name] = record
    hashes = manifest.get("hashes")
    if added:
        hashes = _hashes_note("copy", sum("md5" in o for o in objects.values()), len(objects))
    return {**manifest, "objects": objects, **({"hashes": hashes} if hashes else {}), **extra}


_PART_SIZES_MIB = (5, 8, 10, 16, 25, 32, 50, 64, 100, 128, 256, 512, 1024)


def multipart_count(record: dict) -> int:
    """N for an S3 multipart ETag "<hex>-N" (0 for a plain MD5 or none)."""
    etag = record.get("etag") or ""
    return int(etag.rsplit("-", 1)[1]) if "-" in etag and not record.get("md5") else 0


@dataclass
class ContentCheck:
    """Deep verification of one object: re-hash its bytes and compare with the record.

    Compares with the manifest's md5 when present, else with the ETag: a plain
    MD5 for single-part uploads, or an S3 multipart ETag ("<md5 of part md5s>-N")
    recomputed from the real part sizes (`part_sizes`, from the store) or, when
    the store cannot tell, from each common fixed part size that gives N parts.
    """

    name: str
    record: dict
    part_sizes: list[int] | None = None
    _md5: "hashlib._Hash" = field(default_factory=hashlib.md5)
    _seen: int = 0
    _plans: list = field(default_factory=list)  # [part sizes, hasher, bytes in current part, digests]

    def __post_init__(self):
        n, size = multipart_count(self.record), int(self.record["size"])
        if not n:
            return
        if self.part_sizes and len(self.part_sizes) == n and sum(self.part_sizes) == size:
            plans = [list(self.part_sizes)]
        else:
            plans = []
            for mib in _PART_SIZES_MIB:
                ps = mib * 2**20
                if math.ceil(size / ps) == n:
                    plans.append([ps] * (n - 1) + [size - ps * (n - 1)])
        self._plans = [[plan, hashlib.md5(), 0, []] for plan in plans]

    def update(self, chunk: bytes) -> None:
        self._seen += len(chunk)
        self._md5.update(chunk)
        for state in self._plans:
            plan, view = state[0], memoryview(chunk)
            while view and len(state[3]) < len(plan):
                take = min(len(view), plan[len(state[3])] - state[2])
                state[1].update(view[:take])
                state[2] += take
                view = view[take:]
                if state[2] == plan[len(state[3])]:
                    state[3].append(state[1].digest())
                    state[1], state[2] = hashlib.md5(), 0

    def md5(self) -> str:
        """The MD5 of every byte seen (meaningful once `problems()` is empty)."""
        return self._md5.hexdigest()

    def problems(self) -> list[str]:
        want = int(self.record["size"])
        if self._seen != want:
            return [f"{_label(self.name)} read {self._seen} of {want} bytes"]
        etag = self.record.get("etag") or ""
        if self.record.get("md5"):
            ok = self._md5.hexdigest() == self.record["md5"]
        elif not etag:
            return []  # nothing recorded to compare with: length checked only
        elif not multipart_count(self.record):
            ok = self._md5.hexdigest() == etag
        elif not self._plans:
            return []  # unknown part layout: length checked only
        else:
            ok = any(f"{hashlib.md5(b''.join(s[3])).hexdigest()}-{len(s[3])}" == etag for s in self._plans)
        return [] if ok else [f"{_label(self.name)} content differs from commit (hash mismatch)"]


def prune_plan(states: dict[int, str], keep: int, pinned=(), *, retainable=(COMMITTED,)) -> tuple[int | None, list[int], str]:
    """(anchor, steps to delete, reason). Deletes only retainable steps older than the anchor.

    The anchor is the newest checkpoint that carries a commit (or, for plain
    TorchTitan output, the newest legacy save); if it does not verify, nothing
    is deleted. The newest `max(keep, 1)` retainable steps, the anchor and
    pinned steps are always kept; incomplete/corrupt/quarantined folders are
    never deleted (they are evidence, or a save in progress).
    """
    candidates = {COMMITTED, CORRUPT, QUARANTINED} | set(retainable)
    marked = sorted((s for s, st in states.items() if st in candidates), reverse=True)
    if not marked:
        return None, [], "no committed checkpoint: nothing to prune"
    anchor = marked[0]
    if states[anchor] not in retainable:
        return None, [], f"newest checkpoint step {anchor} is {states[anchor]}: nothing deleted"
    good = sorted((s for s, st in states.items() if st in retainable), reverse=True)
    kept = set(good[: max(keep, 1)]) | {anchor} | {int(p) for p in pinned}
    delete = sorted(s for s in good if s not in kept and s < anchor)
    return anchor, delete, f"keeping {len(good) - len(delete)} of {len(good)} checkpoints (newest: step {anchor})"
