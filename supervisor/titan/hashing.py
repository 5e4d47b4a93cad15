"""DCP storage writers that hash every checkpoint file while they write it.

A commit must never read a shard back (a 6 GB multipart shard has an ETag that
is not its MD5, and re-reading 96 GB per commit takes minutes), yet the
manifest should hold a content hash that survives copies. The bytes pass
through each rank's writer anyway: the stream DCP writes into is teed through
MD5 (hashlib releases the GIL, so the writer threads keep going), each file's
size and MD5 ride to the coordinator inside DCP's own gather of write results,
and the coordinator writes them beside `.metadata` as `_WRITTEN.json`
(supervisor.contract.layout.WRITTEN), with this save's id and start time, which
the commit uses to tell this save's objects from a stale one of the same name.

The records are stripped from the results before `.metadata` is pickled, so
the checkpoint stays plain DCP: TorchTitan and `dcp.load` read it as before.
Works for the local-path writer (a bucket mount) and the fsspec one (`s3://`,
`gs://`), in sync and async (thread) saves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import time
from contextlib import contextmanager
from typing import Any

from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from torch.distributed.checkpoint.filesystem import FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from supervisor.contract import layout
from supervisor.store import manifest as mf


@dataclasses.dataclass
class _HashedStorageInfo(_StorageInfo):
    """DCP's per-item storage info plus its file's size and MD5 (gathered, then stripped)."""

    file_size: int = 0
    file_md5: str = ""
    started: float = 0.0


class _HashingStream:
    """A write stream that hashes what passes through (tell/fileno/... delegated)."""

    def __init__(self, stream):
        self._stream = stream
        self.md5 = hashlib.md5()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.md5.update(view)
        self.size += view.nbytes
        return self._stream.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _HashingFileSystem:
    """Wraps a DCP FileSystem: streams opened for writing are hashed, by file name."""

    def __init__(self, fs):
        self._fs = fs
        self.hashed: dict[str, tuple[int, str]] = {}  # basename -> (size, md5)

    @contextmanager
    def create_stream(self, path, mode: str):
        with self._fs.create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            tee = _HashingStream(stream)
            yield tee
        name = posixpath.basename(os.fspath(path))
        self.hashed[name.removesuffix(".tmp")] = (tee.size, tee.md5.hexdigest())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)


class _HashingMixin:
    """write_data/finish of a FileSystemWriter, with the files' hashes recorded."""

    def _hashing_fs(self) -> _HashingFileSystem:
        if not isinstance(self.fs, _HashingFileSystem):
            self.fs = _HashingFileSystem(self.fs)
        return self.fs

    def write_data(self, plan, planner):
        fs, started = self._hashing_fs(), time.time()
        results = super().write_data(plan, planner).wait()  # FileSystemWriter writes before it returns
        tagged = []
        for result in results:
            info = result.storage_data
            size, md5 = fs.hashed[info.relative_path]
            tagged.append(WriteResult(index=result.index, size_in_bytes=result.size_in_bytes,
                                      storage_data=_HashedStorageInfo(**_fields(info), file_size=size,
                                                                      file_md5=md5, started=started)))
        future: Future = Future()
        future.set_result(tagged)
        return future

    def finish(self, metadata, results) -> None:
        files: dict[str, dict] = {}
        started: list[float] = []
        plain = []
        for rank_results in results:
            kept = []
            for result in rank_results:
                info = result.storage_data
                if isinstance(info, _HashedStorageInfo):
                    files[info.relative_path] = {"size": info.file_size, "md5": info.file_md5}
                    started.append(info.started)
                    info = _StorageInfo(**_fields(info))
                kept.append(WriteResult(index=result.index, size_in_bytes=result.size_in_bytes, storage_data=info))
            plain.append(kept)
        fs = self._hashing_fs()
        super().finish(metadata, plain)
        if layout.METADATA in fs.hashed:
            size, md5 = fs.hashed[layout.METADATA]
            files[layout.METADATA] = {"size": size, "md5": md5}
        record = mf.written_record(files, save_id=str(self.save_id), started=min(started, default=time.time()),
                                   finished=time.time())
        path = self.fs.concat_path(self.path, layout.WRITTEN)
        with fs._fs.create_stream(path, "wb") as out:  # the record itself is not hashed
            out.write(json.dumps(record, indent=1, sort_keys=True).encode())


def _fields(info: _StorageInfo) -> dict:
    return {f.name: getattr(info, f.name) for f in dataclasses.fields(_StorageInfo)}


class HashingFileSystemWriter(_HashingMixin, FileSystemWriter):
    """Local paths, a bucket mount included."""


class HashingFsspecWriter(_HashingMixin, FsspecWriter):
    """Object stores through fsspec (`s3://`, `gs://`)."""


def hashing_writer(checkpoint_id: str):
    """The writer DCP would pick for `checkpoint_id`, hashing as it writes."""
    if "://" in str(checkpoint_id) and not str(checkpoint_id).startswith("file://"):
        # sync_files: an object is durable when its upload completes; DCP's fsync
        # fallback for streams without a descriptor is an os.sync() of the whole VM per file
        return HashingFsspecWriter(checkpoint_id, sync_files=False)
    return HashingFileSystemWriter(str(checkpoint_id).removeprefix("file://"))


