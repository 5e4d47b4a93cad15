"""DCP's FsspecReader with each checkpoint file fetched as concurrent ranged GETs.

DCP reads a rank's files one at a time, and each through one stream: on an
object store that is one GET at a time (fsspec's default: a ranged read per
50 MiB block; `cache_type="all"`: one GET of the whole file), and the file's
tensors are deserialized only after. Here opening a file starts GETs of all its
parts at once, `LOAD_PARALLEL` in flight, and a read waits only for the parts it
covers: the download runs at the store's parallel speed and deserialization
follows it part by part. DCP's own read_data, planner and format are unchanged.
Measured in benchmarks/dcp_store.py.
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress

import fsspec
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader

from supervisor.titan.policy import LOAD_PARALLEL, LOAD_PART_BYTES


class PrefetchedFile(io.RawIOBase):
    """A read-only, seekable view of `path` whose parts are all being fetched."""

    def __init__(self, fs, path: str, size: int, part_bytes: int, pool: ThreadPoolExecutor):
        self._size, self._part, self._pos = size, part_bytes, 0
        self._parts: list[Future] = [pool.submit(fs.cat_file, path, start=s, end=min(s + part_bytes, size))
                                     for s in range(0, size, part_bytes)]  # fmt: skip

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        out = memoryview(buffer).cast("B")
        n = 0
        while n < len(out) and self._pos < self._size:
            index, within = divmod(self._pos, self._part)
            part = self._parts[index].result()  # a failed GET raises here, into DCP's load
            chunk = memoryview(part)[within : within + len(out) - n]
            out[n : n + len(chunk)] = chunk
            n += len(chunk)
            self._pos += len(chunk)
        return n


class _PartsFileSystem(FileSystem):
    """torch's fsspec FileSystem whose read streams are PrefetchedFiles."""

    def __init__(self, fs, part_bytes: int, parallel: int):
        super().__init__()
        self.fs, self.part_bytes, self.parallel = fs, part_bytes, parallel

    @contextmanager
    def create_stream(self, path, mode: str):
        if mode != "rb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        path = os.fspath(path)
        pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="supervise-load")
        try:
            yield PrefetchedFile(self.fs, path, self.fs.size(path), self.part_bytes, pool)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


class PartsReader(FsspecReader):
    """FsspecReader (what DCP picks for a `scheme://` checkpoint) with parallel ranged reads."""

    def __init__(self, path: str, part_bytes: int = LOAD_PART_BYTES, parallel: int = LOAD_PARALLEL, **kwargs):
        super().__init__(path, **kwargs)
        self.fs = _PartsFileSystem(self.fs.fs, part_bytes, parallel)


def import_backend_in_background(url: str) -> threading.Thread | None:
    """Import the fsspec backend of a `scheme://` checkpoint folder in a daemon thread.

    The trainer's first look at the folder (RNG check, TorchTitan's load) would
    otherwise import it on the resume's critical path: s3fs with aiobotocore
    takes about 0.4 s here. Started before TorchTitan builds the model, it is
    done by then. A missing backend is not reported here: TorchTitan's own first
    call raises fsspec's ImportError, where it belongs."""
    protocol, sep, _ = str(url).partition("://")
    if not sep or protocol == "file":
        return None

    def run() -> None:
        with suppress(ImportError, ValueError):  # raised again, in context, by the trainer's first use of the folder
            fsspec.get_filesystem_class(protocol)

    thread = threading.Thread(target=run, name="supervise-import-store", daemon=True)
    thread.start()
    return thread
