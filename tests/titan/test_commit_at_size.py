"""Commits at the size users run: every shard is uploaded in parts (ETag
`"<hex>-N"`, not its MD5), and the commit still reads none of it back.

What the committing process receives from the store is counted by a loopback
TCP proxy in front of the real SeaweedFS (tests/store/tcp_proxy.py); the deep
checks that do read bytes (`verify --deep`, `checkpoints copy`) go to the store
directly. Two ranks of the supervised trainer write shards of >= 256 MiB
(benchmarks/scale_configs.py `llama3_scale_ci`: the llama3 debug model made
wider and deeper with TorchTitan's own builders); a hand `checkpoints commit`
of a plain DCP checkpoint gets the same treatment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from supervisor.ledger.journal import read_events
from supervisor.store.catalog import Catalog
from tests.fixtures_titan import checkpoint_args, start_trainer
from tests.store.dcp_helpers import save
from tests.store.tcp_proxy import FaultProxy

pytestmark = pytest.mark.slow
MULTIPART = 256 * 2**20  # above every uploader's part size (s3fs 50 MiB, rclone 200 MiB cutoff)
ROOT = Path(__file__).resolve().parents[2]


def _fs(url):
    return fsspec.core.url_to_fs(url, skip_instance_cache=True, use_listings_cache=False)


def _shard_gets(proxy: FaultProxy) -> list[str]:
    return [line for line in proxy.seen if line.startswith("GET ") and ".distcp" in line]


def _scale_args(titan_args, dump: Path, config: str) -> list[str]:
    args = titan_args(dump, steps=2, checkpoint_interval=1)
    args[args.index("--module") + 1] = "benchmarks.scale_configs"  # TorchTitan imports it from the cwd
    args[args.index("--config") + 1] = config
    return args


def _check_shards_are_multipart(url: str, step: int) -> int:
    fs, root = _fs(url)
    shards = {p: fs.info(p) for p in fs.ls(f"{root}/step-{step}") if p.endswith(".distcp")}
    assert shards
    for path, info in shards.items():
        assert info["size"] >= MULTIPART and "-" in info["ETag"], (path, info["size"], info["ETag"])
    return sum(info["size"] for info in shards.values())


def _deep_verify_copy_and_a_flip(url: str, step: int, supervise) -> None:  # noqa: F811
    """The reads that are allowed to read bytes: they match, a copy verifies, one flipped byte is caught."""
    res = supervise("checkpoints", "verify", url, "--step", str(step), "--deep")
    assert res.returncode == 0 and "verified (deep)" in res.stdout, (res.stdout, res.stderr)
    res = supervise("checkpoints", "copy", url, f"{url}-copy", "--step", str(step))
    assert res.returncode == 0, res.stderr
    copy = Catalog(f"{url}-copy").inspect(step)
    assert copy.state == "committed" and copy.manifest["copied_from"] == Catalog(url).path(step)

    fs, root = _fs(url)
    shard = f"{root}/step-{step}/__0_0.distcp"
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 1  # same size, one bit
    fs.pipe_file(shard, bytes(data))
    res = supervise("checkpoints", "verify", url, "--step", str(step), "--deep")
    assert res.returncode == 1 and "hash mismatch" in res.stdout + res.stderr, (res.stdout, res.stderr)


def test_the_trainer_commits_multipart_shards_without_reading_them(tmp_path, s3_store, s3_url, titan_args,
                                                                   supervise):  # noqa: F811
    with FaultProxy(s3_store.ports["s3"]) as proxy:
        ledger = str(tmp_path / "ledger")
        env = {"AWS_ENDPOINT_URL": proxy.endpoint, "SUPERVISE_CHECKPOINTS": s3_url, "SUPERVISE_LEDGER": ledger,
               "SUPERVISE_INCARNATION": "a"}
        args = [*_scale_args(titan_args, tmp_path / "dump", "llama3_scale_ci"), "--checkpoint.async_mode", "async",
                *checkpoint_args(s3_url)]  # fmt: skip
        run = start_trainer(args, tmp_path / "run", nproc=2, env={**env, "PYTHONPATH": str(ROOT)})
        assert run.wait(1200) == 0, run.tail()
    cat = Catalog(s3_url)
    assert {i.step: i.state for i in cat.list()} == {1: "committed", 2: "committed"}
    checkpoint_bytes = _check_shards_are_multipart(s3_url, 2)
    assert not _shard_gets(proxy), _shard_gets(proxy)
    # all the trainer received: listings, small files, upload answers; a shard alone is >= 256 MiB
    assert proxy.to_client_bytes < checkpoint_bytes / 1000, (proxy.to_client_bytes, checkpoint_bytes)
    for step in (1, 2):
        manifest = cat.inspect(step).manifest
        assert manifest["hashes"] == "writer" and all("md5" in o for o in manifest["objects"].values()), manifest
    # the async save of step 1: the loop was blocked briefly, its upload (what a stop waits for) is reported too
    events, _ = read_events(ledger)
    durations = {(e.kind, e.fields["step"]): e.fields["duration_s"] for e in events if "duration_s" in e.fields}
    assert durations[("checkpoint_uploaded", 1)] >= durations[("checkpoint_saved", 1)], durations
    assert ("checkpoint_uploaded", 2) not in durations  # the last save is synchronous
    _deep_verify_copy_and_a_flip(s3_url, 2, supervise)


def test_a_hand_commit_of_plain_dcp_reads_no_shard_and_says_what_it_hashed(s3_store, s3_url, supervise):  # noqa: F811
    save(s3_url, 1, extra_mb=MULTIPART // 2**20 + 4)  # plain DCP (FsspecWriter), as plain TorchTitan writes
    checkpoint_bytes = _check_shards_are_multipart(s3_url, 1)
    with FaultProxy(s3_store.ports["s3"]) as proxy:
        res = subprocess.run([sys.executable, "-m", "supervisor", "checkpoints", "commit", s3_url, "--step", "1"],
                             env={**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint}, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert not _shard_gets(proxy) and proxy.to_client_bytes < checkpoint_bytes / 1000, (proxy.seen, proxy.to_client_bytes)
    manifest = Catalog(s3_url).inspect(1).manifest
    shard = manifest["objects"]["__0_0.distcp"]
    assert "md5" not in shard and "-" in shard["etag"], shard  # committed on its size and ETag
    assert "md5" in manifest["objects"][".metadata"]  # a plain single-part ETag is an MD5
    assert manifest["hashes"] == "store for 1 of 2 objects; sizes and ETags for the rest", manifest["hashes"]
    _deep_verify_copy_and_a_flip(s3_url, 1, supervise)
