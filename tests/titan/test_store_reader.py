"""supervisor.titan.store_reader on fsspec's own in-memory filesystem: the bytes a
PrefetchedFile gives back, however it is read, and a DCP round trip through
PartsReader with parts smaller than a tensor. Against SeaweedFS it runs in every
resume from an s3:// checkpoint (tests/titan/test_commits.py, the drills).
The background import of a folder's backend runs in a fresh interpreter, where
s3fs is not imported yet."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

from supervisor.titan.store_reader import PartsReader, PrefetchedFile, import_backend_in_background


@pytest.fixture
def memfs():
    return fsspec.filesystem("memory")


def test_prefetched_file_reads_every_byte_across_parts_and_seeks(memfs):
    data = os.urandom(10_000)
    path = f"/{uuid.uuid4().hex}/blob"
    memfs.pipe_file(path, data)
    with ThreadPoolExecutor(3) as pool:
        f = io.BufferedReader(PrefetchedFile(memfs, path, len(data), 777, pool), buffer_size=100)
        assert f.read(5) == data[:5]
        f.seek(770)  # a read that spans a part boundary
        assert f.read(20) == data[770:790]
        f.seek(-10, io.SEEK_END)
        assert f.read() == data[-10:] and f.read(1) == b""
        f.seek(0)
        assert f.read() == data


def test_dcp_round_trip_through_parts_reader(memfs):
    state = {f"w{i}": torch.randn(300 + i, generator=torch.Generator().manual_seed(i)) for i in range(5)}
    state["step"] = torch.tensor(7)
    url = f"memory://{uuid.uuid4().hex}"
    dcp.save(state, storage_writer=FsspecWriter(url, sync_files=False), no_dist=True)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(target, storage_reader=PartsReader(url, part_bytes=1000, parallel=2), no_dist=True)
    assert all(torch.equal(target[k], state[k]) for k in state)


def test_a_missing_checkpoint_file_is_an_error_not_a_short_read(memfs):
    reader = PartsReader(f"memory://{uuid.uuid4().hex}")
    with pytest.raises(FileNotFoundError):
        with reader.fs.create_stream(f"/{uuid.uuid4().hex}/__0_0.distcp", "rb"):
            pass


def test_the_backend_of_a_remote_folder_is_imported_in_the_background():
    script = ("import sys; from supervisor.titan.store_reader import import_backend_in_background as bg;"
              "assert 's3fs' not in sys.modules; t = bg('s3://bucket/run/checkpoint'); t.join(60);"
              "print(t.name, t.daemon, 's3fs' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["supervise-import-store", "True", "True"]


def test_local_folders_start_no_import_and_an_unknown_scheme_is_left_to_the_first_use(tmp_path):
    assert import_backend_in_background(str(tmp_path / "checkpoint")) is None
    assert import_backend_in_background(f"file://{tmp_path}") is None
    thread = import_backend_in_background("nosuchscheme://bucket/checkpoint")
    thread.join(10)
    assert not thread.is_alive()
    with pytest.raises(ValueError, match="nosuchscheme"):  # what TorchTitan's first call will say
        fsspec.core.url_to_fs("nosuchscheme://bucket/checkpoint")


def test_a_checkpoint_reader_gets_its_own_filesystem_not_fsspec_s_cached_one(monkeypatch):
    """fsspec caches one S3 filesystem per arguments and the endpoint comes from the
    environment: a cached one kept a stopped store's endpoint (CI: the Slurm test's store)."""
    import fsspec

    from supervisor.titan.results import dcp_reader

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    cached = fsspec.filesystem("s3")
    reader = dcp_reader("s3://bucket/run/step-1")
    assert reader.fs.fs is not cached
