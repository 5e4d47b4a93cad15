"""Pure rules of the commit protocol (no store, no processes)."""

import hashlib
import math
from types import SimpleNamespace

import pytest

from supervisor.store import manifest as mf


def test_step_names_are_matched_exactly():
    assert mf.parse_step("step-12") == 12
    for junk in ("bad-step-12", "step-12-old", "step-abc", "step-", "tmp", "xstep-3", "step-1.tmp"):
        assert mf.parse_step(junk) is None


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
    assert mf.content_md5({"ETag": '"0cc175b9c0f1b6a831c399e269772661-3"'}) is None  # multipart: re-read
    assert mf.content_md5({"md5Hash": "DMF1ucDxtqgxw5niaXcmYQ==", "etag": "CJ+x"}) == "0cc175b9c0f1b6a831c399e269772661"
    assert mf.content_md5({}) is None


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
