"""gs:// through gcsfs against fake-gcs-server (the `gcs_url` fixture): the same
commit protocol as S3 -- exclusive create (`ifGenerationMatch=0`), one winner of
a commit race, latest with fallback, prune, and the start-up canary."""

import subprocess
import sys
import time

import fsspec
import pytest

from supervisor.store.catalog import Catalog
from tests.store.dcp_helpers import save
from tests.store.commit_race import RACE

pytestmark = pytest.mark.slow


def test_commit_latest_and_a_torn_newer_step(gcs_url):
    cat = Catalog(gcs_url)
    cat.prove_conditional_create()  # the canary passes on a store that enforces preconditions
    save(gcs_url, 1)
    manifest = cat.commit(1, writer="test")
    assert {".metadata", "__0_0.distcp"} <= set(manifest["objects"])
    assert all(len(o["md5"]) == 32 for o in manifest["objects"].values())  # from GCS's md5Hash
    save(gcs_url, 2)
    cat.commit(2)
    assert cat.latest(deep=True).step == 2 and cat.verify(2, deep=True).state == "committed"
    fs = fsspec.filesystem("gs", skip_instance_cache=True)
    shard = f"{gcs_url}/step-2/__0_0.distcp"
    fs.pipe_file(shard, fs.cat_file(shard)[:-1])
    latest = cat.latest()
    assert latest.step == 1 and latest.skipped[0][0] == 2 and "truncated" in latest.skipped[0][1]
    assert {i.step: i.state for i in cat.list()} == {1: "committed", 2: "quarantined"}
    assert not fs.exists(f"{gcs_url}/_canary")


def test_second_create_loses_and_two_committers_race_one_wins(gcs_url):
    store = Catalog(gcs_url).store
    assert store.create_exclusive(b"first", "k", "_COMMIT.json") is True
    assert store.create_exclusive(b"second", "k", "_COMMIT.json") is False
    assert store.cat("k", "_COMMIT.json") == b"first"

    save(gcs_url, 5)
    go = time.time() + 4.0
    procs = [subprocess.Popen([sys.executable, "-c", RACE, gcs_url, "5", str(go), f"w{i}"],
                              stdout=subprocess.PIPE, text=True) for i in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert sorted(o.split()[0] for o in outs) == ["LOST", "WON"], outs
    info = Catalog(gcs_url).verify(5, deep=True)
    winner = next(i for i, o in enumerate(outs) if o.startswith("WON"))
    assert info.state == "committed" and info.manifest["writer"] == f"w{winner}"


def test_prune_on_gcs(gcs_url):
    cat = Catalog(gcs_url)
    for step in (1, 2, 3):
        save(gcs_url, step)
        cat.commit(step)
    assert cat.prune(keep=1, dry_run=True).delete == [1, 2]
    result = cat.prune(keep=1, dry_run=False)
    assert result.delete == [1, 2] and [i.step for i in cat.list()] == [3]
    assert cat.latest().step == 3
