"""The hashing DCP writers (supervisor.titan.hashing): what they record is the
files' real sizes and MD5s, and the checkpoint stays plain DCP."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo

from supervisor.store import manifest as mf
from supervisor.titan.hashing import HashingFileSystemWriter, HashingFsspecWriter, hashing_writer


@pytest.mark.parametrize("writer", [HashingFileSystemWriter, HashingFsspecWriter])
def test_the_record_holds_every_file_as_written_and_the_checkpoint_stays_plain_dcp(tmp_path, writer):
    state = {"w": torch.arange(300_000, dtype=torch.float32), "b": torch.ones(7), "step": 3}
    dcp.save(state, storage_writer=writer(str(tmp_path)), no_dist=True)

    record = mf.parse_written((tmp_path / mf.WRITTEN).read_bytes())
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != mf.WRITTEN}
    assert set(record["files"]) == set(files) and mf.METADATA in files and any(n.endswith(".distcp") for n in files)
    for name, data in files.items():
        assert record["files"][name] == {"size": len(data), "md5": hashlib.md5(data).hexdigest()}, name
    metadata = pickle.loads(files[mf.METADATA])
    assert record["save_id"] == str(metadata.storage_meta.save_id)
    assert record["started"] <= record["finished"]
    # the gathered hashes were stripped: `.metadata` holds DCP's own storage info only
    assert {type(info) for info in metadata.storage_data.values()} == {_StorageInfo}

    loaded = {"w": torch.zeros(300_000), "b": torch.zeros(7), "step": 0}
    dcp.load(loaded, checkpoint_id=str(tmp_path), no_dist=True)  # plain DCP reader
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"]) and loaded["step"] == 3


def test_the_writer_is_picked_by_where_the_checkpoint_goes(tmp_path):
    assert type(hashing_writer(str(tmp_path))) is HashingFileSystemWriter
    assert type(hashing_writer(f"file://{tmp_path}")) is HashingFileSystemWriter
    assert type(hashing_writer("s3://bucket/run/step-1")) is HashingFsspecWriter
