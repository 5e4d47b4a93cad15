"""A committed catalog copied to another prefix stays committed, whatever the copy
did to the ETags (server-side copy, put, multipart re-upload with another part
size); only a real content change is caught. And `supervise checkpoints copy`."""

import fsspec
import pytest

from supervisor.store.catalog import Catalog
from tests.store.dcp_helpers import save

pytestmark = pytest.mark.slow
PART = 5 * 2**20  # S3's smallest part


def _fs(url):
    return fsspec.core.url_to_fs(url, skip_instance_cache=True, use_listings_cache=False)


def _multipart_put(fs, path: str, data: bytes) -> None:
    bucket, _, key = path.partition("/")
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    parts = []
    for n, offset in enumerate(range(0, len(data), PART), start=1):
        out = fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=n,
                         Body=data[offset : offset + PART])  # fmt: skip
        parts.append({"ETag": out["ETag"], "PartNumber": n})
    fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"],
               MultipartUpload={"Parts": parts})  # fmt: skip


def _objects(fs, root):
    return [p for p in fs.find(root) if not p.endswith("/")]


def test_copies_three_ways_stay_committed_and_a_flip_is_caught(s3_url, tmp_path, supervise):  # noqa: F811
    src = f"{s3_url}/src"
    cat = Catalog(src)
    for step in (1, 2):
        save(src, step, extra_mb=12)  # one 12 MB shard per step, uploaded as one plain PUT
        cat.commit(step)
    fs, root = _fs(src)
    base = root.rsplit("/", 1)[0]
    copies = {"server": f"{base}/server", "put": f"{base}/put", "multipart": f"{base}/multipart"}
    fs.copy(root, copies["server"], recursive=True)  # server-side CopyObject
    fs.get(root, str(tmp_path / "local"), recursive=True)
    fs.put(str(tmp_path / "local"), copies["put"], recursive=True)
    for path in _objects(fs, root):
        _multipart_put(fs, copies["multipart"] + path[len(root):], fs.cat_file(path))
    shard = "step-2/__0_0.distcp"
    committed_etag = cat.inspect(2).manifest["objects"]["__0_0.distcp"]["etag"]
    assert fs.info(f"{copies['multipart']}/{shard}")["ETag"].strip('"') != committed_etag  # "<md5>-3"

    for how, path in copies.items():
        url = f"s3://{path}"
        copy = Catalog(url)
        assert copy.latest().step == 2, how
        assert {i.step: i.state for i in copy.list()} == {1: "committed", 2: "committed"}, how
        res = supervise("checkpoints", "verify", url, "--step", "2", "--deep")
        assert res.returncode == 0 and "verified (deep)" in res.stdout, (how, res.stderr)

    flipped = f"{copies['multipart']}/{shard}"  # one byte, same size, re-uploaded: a real change
    data = bytearray(fs.cat_file(flipped))
    data[len(data) // 2] ^= 1
    _multipart_put(fs, flipped, bytes(data))
    assert supervise("checkpoints", "verify", f"s3://{copies['multipart']}", "--step", "2", "--deep").returncode == 1
    latest = Catalog(f"s3://{copies['multipart']}").latest()
    assert latest.step == 1 and "hash mismatch" in latest.skipped[0][1]


def test_checkpoints_copy_command_to_a_prefix_and_to_a_local_folder(s3_url, tmp_path, supervise):  # noqa: F811
    src = f"{s3_url}/src"
    cat = Catalog(src)
    for step in (1, 2, 3):
        save(src, step)
        cat.commit(step)
    save(src, 4)  # not committed: never copied
    res = supervise("checkpoints", "copy", src, f"{s3_url}/dst")
    assert res.returncode == 0 and "step-1, step-2, step-3" in res.stdout, res.stderr
    dst = Catalog(f"{s3_url}/dst")
    assert [i.state for i in dst.list()] == ["committed"] * 3 and dst.latest(deep=True).step == 3
    assert dst.inspect(3).manifest["copied_from"] == cat.path(3)

    local = str(tmp_path / "local")
    assert supervise("checkpoints", "copy", src, local, "--step", "2").returncode == 0
    assert Catalog(local).latest(deep=True).step == 2 and [i.step for i in Catalog(local).list()] == [2]
    again = supervise("checkpoints", "copy", src, local, "--step", "2")
    assert again.returncode == 1 and "already committed" in again.stderr
    bad = supervise("checkpoints", "copy", src, local, "--step", "4")
    assert bad.returncode == 1 and "step 4 is legacy" in bad.stderr
