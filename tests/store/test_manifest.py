"""Pure rules of the commit protocol (no store, no processes)."""

import hashlib
import math
from types import SimpleNamespace

import pytest

from supervisor.contract import layout
from supervisor.store import manifest as mf


def test_step_names_are_matched_exactly():
    assert layout.parse_step("step-12") == 12
    for junk in ("bad-step-12", "step-12-old", "step-abc", "step-", "tmp", "xstep-3", "step-1.tmp"):
        assert layout.parse_step(junk) is None


def _metadata(entries):
    info = lambda path, off, n: SimpleNamespace(relative_path=path, offset=off, length=n)  # noqa: E731
    return SimpleNamespace(storage_data={i: info(*e) for i, e in enumerate(entries)})


def test_required_sizes_take_the_furthest_byte_per_file():
    md = _metadata([("__0_0.distcp", 0, 100), ("__0_0.distcp", 100, 50), ("__1_0.distcp", 0, 10)])
    assert mf.required_sizes(md) == {"__0_0.distcp": 150, "__1_0.distcp": 10}


def test_structural_problems_name_missing_and_truncated_shards():
    need = {"__0_0.distcp": 150, "__1_0.distcp": 10}
    assert mf.structural_problems(need, {"__0_0.distcp": {"size": 150}, "__1_0.distcp": {"size": 99}}) == []
    problems = mf.structural_problems(need, {"__0_0.distcp": {"size": 149}})
    assert problems == ["shard __0_0.distcp truncated (149 of 150 bytes)", "shard __1_0.distcp missing"]


def test_manifest_round_trip_and_drift():
    listing = {
        ".metadata": {"size": 5, "ETag": '"aa"', "type": "file"},
        "__0_0.distcp": {"size": 9, "ETag": '"bb"', "type": "file"},
        mf.COMMIT: {"size": 1, "type": "file"},
        "sub": {"size": 0, "type": "directory"},
    }
    m = mf.build_manifest(7, listing, world_size=1, writer="w", versions={}, created="t")
    assert set(m["objects"]) == {".metadata", "__0_0.distcp"}
    assert mf.parse_manifest(__import__("json").dumps(m).encode(), 7) == m
    assert mf.manifest_problems(m, listing) == []
    changed = dict(listing, **{"__0_0.distcp": {"size": 9, "ETag": '"cc"'}})
    assert mf.manifest_problems(m, changed) == []  # same size, other ETag: a copy, maybe; the bytes decide
    assert mf.etag_changed(m, changed) == ["__0_0.distcp"]
    copy = mf.rebased(m, changed, copied_from="src")
    assert copy["objects"]["__0_0.distcp"]["etag"] == "cc" and copy["copied_from"] == "src"
    assert mf.etag_changed(copy, changed) == []
    assert "size changed" in mf.manifest_problems(m, dict(listing, **{"__0_0.distcp": {"size": 10}}))[0]
    with pytest.raises(ValueError, match="names step 7"):
        mf.parse_manifest(__import__("json").dumps(m).encode(), 8)
    with pytest.raises(ValueError, match="unreadable"):
        mf.parse_manifest(b"{trunc", 7)


def test_content_md5_from_what_the_store_reports():
    assert mf.content_md5({"ETag": '"0CC175B9C0F1B6A831C399E269772661"'}) == "0cc175b9c0f1b6a831c399e269772661"
    assert mf.content_md5({"ETag": '"0cc175b9c0f1b6a831c399e269772661-3"'}) is None  # multipart: not an MD5
    assert mf.content_md5({"md5Hash": "DMF1ucDxtqgxw5niaXcmYQ==", "etag": "CJ+x"}) == "0cc175b9c0f1b6a831c399e269772661"
    assert mf.content_md5({}) is None


def test_modified_at_reads_s3_gcs_and_local_timestamps():
    import datetime as dt

    when = dt.datetime(2026, 12, 6, 12, 0, 0, tzinfo=dt.timezone.utc)
    assert mf.modified_at({"LastModified": when}) == when.timestamp()  # s3fs: aware datetime
    assert mf.modified_at({"LastModified": when.replace(tzinfo=None)}) == when.timestamp()  # naive: UTC
    assert mf.modified_at({"updated": "2026-12-06T12:00:00.000Z"}) == when.timestamp()  # gcsfs
    assert mf.modified_at({"mtime": 1234.5}) == 1234.5  # a local file
    assert mf.modified_at({"LastModified": "yesterday"}) is None and mf.modified_at({}) is None


def _record(started=1000.0, save_id="s1", **files):
    return mf.written_record(files or {"__0_0.distcp": {"size": 10, "md5": "a" * 32}}, save_id=save_id,
                             started=started, finished=started + 5)


def test_stale_objects_are_told_from_this_saves_without_reading_them():
    record = _record()
    ok = {"__0_0.distcp": {"size": 10, "LastModified": 1001.0, "ETag": '"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-2"'}}
    assert mf.stale_problems(record, ok, "s1") == []
    assert mf.stale_problems(record, ok, None) == []  # a `.metadata` without an id: the objects decide
    assert "different saves" in mf.stale_problems(record, ok, "s0")[0]  # .metadata of another save
    assert mf.stale_problems(record, {}, "s1") == ["shard __0_0.distcp missing"]
    short = {"__0_0.distcp": dict(ok["__0_0.distcp"], size=9)}
    assert "is 9 bytes, this save wrote 10" in mf.stale_problems(record, short, "s1")[0]
    # same name, same size, written before this save began: an earlier save's object
    old = {"__0_0.distcp": dict(ok["__0_0.distcp"], LastModified=1000.0 - mf.CLOCK_TOLERANCE_S - 1)}
    assert "older than this save" in mf.stale_problems(record, old, "s1")[0]
    skewed = {"__0_0.distcp": dict(ok["__0_0.distcp"], LastModified=1000.0 - mf.CLOCK_TOLERANCE_S + 0.5)}
    assert mf.stale_problems(record, skewed, "s1") == []  # within the store's clock tolerance
    other = {"__0_0.distcp": {"size": 10, "LastModified": 1001.0, "ETag": '"' + "b" * 32 + '"'}}
    assert "another MD5" in mf.stale_problems(record, other, "s1")[0]  # a plain ETag is an MD5: compared


def test_written_record_round_trip_and_bad_records():
    record = _record()
    assert mf.parse_written(__import__("json").dumps(record).encode()) == record
    with pytest.raises(ValueError, match="unreadable"):
        mf.parse_written(b"{")
    with pytest.raises(ValueError, match="unknown"):
        mf.parse_written(b'{"format": "other/1", "files": {}}')


def test_manifest_says_which_objects_have_hashes():
    listing = {".metadata": {"size": 5, "ETag": '"' + "a" * 32 + '"'}, "__0_0.distcp": {"size": 9, "ETag": '"b-3"'}}
    build = lambda md5s, hashes: mf.build_manifest(1, listing, world_size=1, writer="w", versions={}, created="t",  # noqa: E731
                                                   md5s=md5s, hashes=hashes)  # fmt: skip
    assert build({".metadata": "a" * 32, "__0_0.distcp": "c" * 32}, "writer")["hashes"] == "writer"
    assert build({".metadata": "a" * 32}, "store")["hashes"] == "store for 1 of 2 objects; sizes and ETags for the rest"
    assert build({}, "store")["hashes"] == "none: sizes and ETags"
    copy = mf.rebased(build({".metadata": "a" * 32}, "store"), listing, {"__0_0.distcp": "c" * 32})
    assert copy["hashes"] == "copy" and copy["objects"]["__0_0.distcp"]["md5"] == "c" * 32


def test_content_check_plain_and_multipart_etags():
    data = bytes(range(256)) * 50_000  # 12.8 MB
    plain = mf.ContentCheck("x", {"size": len(data), "etag": hashlib.md5(data).hexdigest()})
    plain.update(data)
    assert plain.problems() == []
    ps = 5 * 2**20
    parts = [hashlib.md5(data[i : i + ps]).digest() for i in range(0, len(data), ps)]
    etag = f"{hashlib.md5(b''.join(parts)).hexdigest()}-{math.ceil(len(data) / ps)}"
    multi = mf.ContentCheck("x", {"size": len(data), "etag": etag})
    for i in range(0, len(data), 3_000_000):
        multi.update(data[i : i + 3_000_000])
    assert multi.problems() == []
    flipped = mf.ContentCheck("__0_0.distcp", {"size": len(data), "etag": etag})
    flipped.update(data[:-1] + b"\x00")
    assert flipped.problems() == ["shard __0_0.distcp content differs from commit (hash mismatch)"]


C, X, Q, I = mf.COMMITTED, mf.CORRUPT, mf.QUARANTINED, mf.INCOMPLETE


@pytest.mark.parametrize(
    "states, keep, pinned, expect_delete",
    [
        ({1: C, 2: C, 3: C}, 0, (), [1, 2]),  # keep 0 still keeps the newest
        ({1: C, 2: C, 3: C}, 1, (), [1, 2]),
        ({1: C, 2: C, 3: C}, 2, (), [1]),
        ({1: C, 2: C, 3: C}, 1, (1,), [2]),
        ({1: C, 2: C, 3: X}, 0, (), []),  # newest does not verify: nothing deleted
        ({1: C, 2: C, 3: Q}, 0, (), []),
        ({1: C, 2: I, 3: C, 4: I}, 0, (), [1]),  # incomplete folders are never touched
        ({1: I, 2: I}, 0, (), []),
    ],
)
def test_prune_plan(states, keep, pinned, expect_delete):
    anchor, delete, _ = mf.prune_plan(states, keep, pinned)
    assert delete == expect_delete
    if delete:
        assert anchor == max(s for s, st in states.items() if st == C)


def test_content_check_uses_the_real_uneven_part_sizes():
    data = bytes(range(256)) * 40_000  # 10.24 MB in two uneven parts, as s3fs uploads them
    sizes = [6_000_001, len(data) - 6_000_001]
    parts = [hashlib.md5(data[: sizes[0]]).digest(), hashlib.md5(data[sizes[0] :]).digest()]
    record = {"size": len(data), "etag": f"{hashlib.md5(b''.join(parts)).hexdigest()}-2"}
    check = mf.ContentCheck("x", record, part_sizes=sizes)
    for i in range(0, len(data), 1_000_000):
        check.update(data[i : i + 1_000_000])
    assert check.problems() == []
