"""The catalog against a real SeaweedFS and real DCP saves (1 and 2 writer ranks)."""

import os
import subprocess
import sys
import time

import fsspec
import pytest

from supervisor.store.catalog import AlreadyCommitted, Catalog, IncompleteCheckpoint
from tests.store.commit_race import RACE
from tests.store.dcp_helpers import save, save_ranks

pytestmark = pytest.mark.slow


def _fs(url):
    return fsspec.core.url_to_fs(url, skip_instance_cache=True, use_listings_cache=False)


def _rewrite(url, transform):
    fs, path = _fs(url)
    fs.pipe_file(path, transform(fs.cat_file(path)))


def test_commit_then_torn_newer_steps_fall_back(s3_url):
    cat = Catalog(s3_url)
    save(s3_url, 1)
    manifest = cat.commit(1, writer="test")
    assert manifest["world_size"] == 1 and {".metadata", "__0_0.distcp"} <= set(manifest["objects"])
    assert cat.latest().step == 1

    save(s3_url, 2)  # .metadata present, shard missing
    fs, path = _fs(f"{s3_url}/step-2/__0_0.distcp")
    fs.rm_file(path)
    with pytest.raises(IncompleteCheckpoint, match="__0_0.distcp missing"):
        cat.commit(2)

    save(s3_url, 3)  # shard truncated
    _rewrite(f"{s3_url}/step-3/__0_0.distcp", lambda b: b[: len(b) // 2])
    with pytest.raises(IncompleteCheckpoint, match="truncated"):
        cat.commit(3)

    save(s3_url, 4)  # committed, then a shard overwritten with other bytes of the same size
    cat.commit(4)
    assert cat.latest().step == 4
    _rewrite(f"{s3_url}/step-4/__0_0.distcp", lambda b: bytes(x ^ 0xFF for x in b))
    assert not cat.verify(4, deep=True).ok

    latest = cat.latest()
    assert latest.step == 1 and latest.state == "committed"
    assert "step 4 quarantined" in latest.describe() and "__0_0.distcp" in latest.describe()
    states = {i.step: i.state for i in cat.list()}
    assert states == {1: "committed", 2: "incomplete", 3: "incomplete", 4: "quarantined"}
    assert fsspec.core.url_to_fs(f"{s3_url}/step-4/__0_0.distcp")[0].exists(f"{s3_url}/step-4/__0_0.distcp")


def test_two_writer_ranks_commit_and_torn_rank1_shard(s3_url):
    cat = Catalog(s3_url)
    save_ranks(s3_url, 10, world=2)
    save_ranks(s3_url, 20, world=2)
    assert cat.commit(10)["world_size"] == 2
    cat.commit(20)
    assert cat.latest(deep=True).step == 20
    _rewrite(f"{s3_url}/step-20/__1_0.distcp", lambda b: b[:-1])
    latest = cat.latest()
    assert latest.step == 10
    assert latest.skipped and latest.skipped[0][0] == 20 and "__1_0.distcp truncated" in latest.skipped[0][1]


def test_deep_catches_same_size_overwrite_on_a_plain_path(tmp_path):
    url = str(tmp_path / "ckpt")
    cat = Catalog(url)
    save(url, 1, hashed=True)
    cat.commit(1, written=True)
    save(url, 2, hashed=True)
    assert cat.commit(2, written=True)["hashes"] == "writer"
    shard = tmp_path / "ckpt" / "step-2" / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    assert cat.verify(2).ok  # sizes still match: only a re-hash can tell
    info = cat.verify(2, deep=True)
    assert info.state == "corrupt" and "hash mismatch" in info.reason
    latest = cat.latest(deep=True)
    assert latest.step == 1 and latest.skipped[0][0] == 2
    assert (tmp_path / "ckpt" / "step-2" / "_QUARANTINE.json").exists() and shard.exists()


def test_a_resave_is_not_committed_while_an_older_shard_of_the_same_name_is_there(s3_url, tmp_path):
    from supervisor.store.manifest import CLOCK_TOLERANCE_S

    fs, root = _fs(s3_url)
    save(s3_url, 1, extra_mb=6, hashed=True)  # a save of step 1 that was never committed (the node died)
    time.sleep(CLOCK_TOLERANCE_S + 1.5)
    again = save(str(tmp_path / "again"), 1, extra_mb=6, hashed=True)  # the same step saved again: same names, sizes
    old_shard = fs.info(f"{root}/step-1/__0_0.distcp")
    assert old_shard["size"] == os.path.getsize(f"{again}/__0_0.distcp")
    for name in (".metadata", "_WRITTEN.json"):  # the new save's small files landed, its shard not yet
        fs.put_file(f"{again}/{name}", f"{root}/step-1/{name}")
    cat = Catalog(s3_url)
    for written in (True, False):  # the trainer's commit and a hand one
        with pytest.raises(IncompleteCheckpoint, match="__0_0.distcp is older than this save"):
            cat.commit(1, written=written, wait_s=1)
    assert not fs.exists(f"{root}/step-1/_COMMIT.json")
    fs.put_file(f"{again}/__0_0.distcp", f"{root}/step-1/__0_0.distcp")  # the upload lands
    assert cat.commit(1, written=True)["hashes"] == "writer"
    assert cat.latest().step == 1


def test_second_conditional_create_loses_and_keeps_the_first(s3_url):
    store = Catalog(s3_url).store
    assert store.create_exclusive(b"first", "k", "_COMMIT.json") is True
    assert store.create_exclusive(b"second", "k", "_COMMIT.json") is False
    assert store.cat("k", "_COMMIT.json") == b"first"


def test_two_processes_commit_the_same_step_exactly_one_wins(s3_url):
    import time

    save(s3_url, 5)
    go = time.time() + 4.0
    procs = [
        subprocess.Popen([sys.executable, "-c", RACE, s3_url, "5", str(go), f"w{i}"], stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert sorted(o.split()[0] for o in outs) == ["LOST", "WON"], outs
    assert "already committed" in next(o for o in outs if o.startswith("LOST"))
    info = Catalog(s3_url).verify(5, deep=True)
    assert info.state == "committed"
    winner = next(i for i, o in enumerate(outs) if o.startswith("WON"))
    assert info.manifest["writer"] == f"w{winner}"


def test_junk_folders_are_ignored_and_never_deleted(s3_url):
    cat = Catalog(s3_url)
    for step in (1, 2, 3):
        save(s3_url, step)
        cat.commit(step)
    fs, root = _fs(s3_url)
    junk = [f"{root}/bad-step-12/.metadata", f"{root}/step-abc/.metadata", f"{root}/tmp/x", f"{root}/random.txt",
            f"{root}/step-7.tmp"]  # fmt: skip
    for path in junk:
        fs.pipe_file(path, fs.cat_file(f"{root}/step-3/.metadata"))
    assert [i.step for i in cat.list()] == [1, 2, 3]
    assert cat.latest().step == 3
    result = cat.prune(keep=1, dry_run=False)
    assert result.delete == [1, 2]
    assert [i.step for i in cat.list()] == [3]
    for path in junk:
        assert fs.exists(path), path


def test_prune_keeps_newest_verified_and_stops_when_newest_is_bad(s3_url):
    cat = Catalog(s3_url)
    for step in (1, 2, 3, 4):
        save(s3_url, step)
        cat.commit(step)
    _rewrite(f"{s3_url}/step-4/__0_0.distcp", lambda b: b[:10])
    result = cat.prune(keep=0, dry_run=False)
    assert result.delete == [] and "step 4" in result.reason
    assert [i.step for i in cat.list()] == [1, 2, 3, 4]

    assert cat.latest().step == 3  # quarantines step 4
    assert cat.prune(keep=0, dry_run=True).delete == []  # newest marked step is quarantined
    fs, root = _fs(s3_url)
    fs.rm(f"{root}/step-4", recursive=True)  # an emptied (or just started) folder is no checkpoint
    dry = cat.prune(keep=0)
    states = {i.step: i.state for i in cat.list()}
    assert dry.delete == [1, 2] and states == {1: "committed", 2: "committed", 3: "committed", 4: "incomplete"}
    cat.prune(keep=0, pinned=(1,), dry_run=False)
    assert [i.step for i in cat.list()] == [1, 3, 4]
    assert cat.latest().step == 3


def test_empty_catalog_and_commit_of_missing_step(s3_url):
    cat = Catalog(s3_url)
    assert cat.list() == [] and cat.latest().step is None
    assert cat.latest().describe() == "no valid checkpoint"
    with pytest.raises(IncompleteCheckpoint, match="folder missing"):
        cat.commit(9)
    assert not isinstance(AlreadyCommitted("x"), IncompleteCheckpoint)
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")


def test_prune_aborts_only_stale_multipart_uploads_under_the_catalog(s3_url):
    cat = Catalog(s3_url)
    save(s3_url, 1)
    cat.commit(1)
    fs, root = _fs(s3_url)
    bucket, _, prefix = root.partition("/")
    mine = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=f"{prefix}/step-2/__0_0.distcp")
    other = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=f"{prefix}-other/x")

    def open_uploads():
        return {u["UploadId"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])}

    result = cat.prune(keep=1, dry_run=False)
    assert "multipart" not in result.reason and mine["UploadId"] in open_uploads()  # minutes old: a save in flight
    assert cat.store.abort_stale_uploads(0, dry_run=True) == [f"{prefix}/step-2/__0_0.distcp"]
    assert mine["UploadId"] in open_uploads()
    assert cat.store.abort_stale_uploads(0, dry_run=False) == [f"{prefix}/step-2/__0_0.distcp"]
    assert mine["UploadId"] not in open_uploads() and other["UploadId"] in open_uploads()  # outside the prefix
    fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=f"{prefix}-other/x", UploadId=other["UploadId"])
