"""The catalog's only door to storage: fsspec + one retry policy + clear errors.

`s3://`, `gs://`, `file://` and plain paths work alike. The S3 endpoint and
credentials come from the standard AWS environment (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, ...), which botocore reads by itself; GCS credentials from
Google's application-default chain (gcsfs), `STORAGE_EMULATOR_HOST` for an emulator.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

from supervisor.errors import first_line
from supervisor.store import retry
from supervisor.store.errors import StoreInputError, StoreUnreachable

READ_PART_BYTES = 16 * 2**20  # a ranged GET when bytes are read back (deep verify, copies)
READ_PARALLEL = 8


def _options(protocol: str) -> dict:
    # Own instance (no shared cache, listings always fresh); for S3 the retry
    # policy in retry.py is the only one (botocore and s3fs retries off). A local
    # folder is made on the first write into it, as an object store's prefix is.
    if protocol in ("file", "local"):
        return {"auto_mkdir": True}
    if protocol in ("s3", "s3a"):
        return {
            "skip_instance_cache": True,
            "use_listings_cache": False,
            "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}},
        }
    if protocol in ("gs", "gcs"):
        return {"skip_instance_cache": True, "use_listings_cache": False}
    return {}


def _is_s3(fs) -> bool:
    return bool({"s3", "s3a"} & set(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)))


def _exists_error(err: BaseException | None) -> bool:
    """A conditional create that lost: fsspec's FileExistsError (gcsfs: 412; s3fs when
    the store names the failed condition), or s3fs's EINVAL for a bare 412
    PreconditionFailed (SeaweedFS does not name the condition)."""
    return isinstance(err, FileExistsError) or (
        isinstance(err, OSError) and err.errno == errno.EINVAL and "pre-condition" in str(err)
    )


class Store:
    """A folder in an object store or file system, seen through fsspec."""

    def __init__(self, url: str, policy: retry.Policy = retry.PATIENT):
        import fsspec

        url = str(url)
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **_options(protocol))
        except (ValueError, ImportError) as err:  # fsspec's "Install s3fs ..." hides why: say it
            why = f" ({err.__cause__})" if isinstance(err.__cause__, ImportError) else ""
            raise StoreInputError(f"cannot open {url!r}: {err}{why}") from err
        if hasattr(self.fs, "retries"):
            self.fs.retries = 1
        self.url = url.rstrip("/")
        self.root = root.rstrip("/") or root
        self.remote = protocol not in ("file", "local")
        self.policy = policy

    # -- paths --------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url_of(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    # -- calls (all retried, all errors translated) -------------------------------
    def _call(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return self.policy.call(fn, *args, **kwargs)
        except Exception as err:
            raise self._translate(what, err) from err

    def _translate(self, what: str, err: Exception) -> Exception:
        if isinstance(err, (FileNotFoundError, FileExistsError)):
            return err  # callers decide what "missing" / "exists" mean
        if retry.is_transient(err):
            return StoreUnreachable(
                f"{what} {self.url}: store unreachable after retrying {self.policy.deadline_s():.0f}s "
                f"({type(err).__name__}: {first_line(err)}); check AWS_ENDPOINT_URL and the network"
            )
        if isinstance(err, PermissionError):
            return StoreInputError(
                f"{what} {self.url}: access denied ({first_line(err)}); check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or your profile) and the bucket policy"
            )
        if type(err).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            return StoreInputError(f"{what} {self.url}: no credentials ({err}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        if isinstance(err, (OSError, ValueError)) or type(err).__module__.startswith("botocore"):
            return StoreInputError(f"{what} {self.url}: {type(err).__name__}: {first_line(err)}")
        return err

    def listdir(self, *parts: str) -> dict[str, dict]:
        """Basename -> entry (type, size, ETag where the store has one). Missing folder -> {}."""
        path = self.path(*parts)
        try:
            entries = self._call("list", self.fs.ls, path, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for entry in entries:
            if entry["name"].endswith("/"):
                continue  # the folder's own marker object (SeaweedFS keeps one for emptied folders)
            if entry["name"] == path.rstrip("/") and entry.get("type") != "directory":
                raise StoreInputError(f"{self.url_of(*parts)} is a file, not a folder of step-N checkpoints")
            out[posixpath.basename(entry["name"])] = entry
        return out

    def cat(self, *parts: str) -> bytes:
        return self._call("read", self.fs.cat_file, self.path(*parts))

    def put(self, data: bytes, *parts: str) -> None:
        self._call("write", self.fs.pipe_file, self.path(*parts), data)

    def create_exclusive(self, data: bytes, *parts: str) -> bool:
        """Create an object only if it does not exist; False if it already did.

        Remote: fsspec's exclusive write, `pipe_file(..., mode="create")`
        (s3fs: `If-None-Match: *`; gcsfs: `ifGenerationMatch=0`). Whether a store
        really enforces it is proven at start by `conditional_create_problem`.
        Local: write a temp file and hard-link it into place (atomic, fails if
        the name exists, never half-written).
        """
        path = self.path(*parts)
        if not self.remote:
            return _local_create_exclusive(path, data)
        try:
            self._call("commit", self.fs.pipe_file, path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except StoreInputError as err:
            if _exists_error(err.__cause__):
                return False
            raise

    def move(self, src: tuple[str, ...], dst: tuple[str, ...]) -> None:
        """Rename within the store (object stores: copy, then delete the source)."""
        self._call("move", self.fs.mv, self.path(*src), self.path(*dst))

    def rm(self, paths: list[str]) -> None:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                self._call("delete", self.fs.rm_file, p)

    def rmdir_if_empty(self, *parts: str) -> None:
        """Drop an emptied folder (locally) or its leftover folder marker object (S3;
        GCS has no folder objects)."""
        path = self.path(*parts)
        if not self.remote:
            with contextlib.suppress(OSError):
                os.rmdir(path)
        elif _is_s3(self.fs) and not self.listdir(*parts):
            bucket, _, key = path.partition("/")
            with contextlib.suppress(FileNotFoundError):
                self._call("delete", self.fs.call_s3, "delete_object", Bucket=bucket, Key=key.rstrip("/") + "/")

    def check_container(self) -> None:
        """A missing bucket / a root that is a file is an input error, not an empty catalog."""
        if not self.remote:
            if os.path.isfile(self.root):
                raise StoreInputError(f"{self.url} is a file, not a folder of step-N checkpoints")
            return
        bucket = self.root.split("/", 1)[0]
        missing = f"bucket {bucket!r} does not exist ({self.url}); create it or name an existing one"
        try:
            self._call("open", self.fs.ls, bucket)
        except FileNotFoundError as err:
            raise StoreInputError(missing) from err
        except StoreInputError as err:
            if "NoSuchBucket" in str(err) or "does not exist" in str(err):
                raise StoreInputError(missing) from err
            raise

    def abort_stale_uploads(self, older_than_s: float, dry_run: bool = True) -> list[str]:
        """Unfinished S3 multipart uploads under this folder started more than
        `older_than_s` ago (a writer killed mid-upload leaves them, billed, invisible
        to listings): their keys; aborted unless `dry_run`. Other stores: []."""
        if not self.remote or not _is_s3(self.fs):
            return []
        import datetime as dt

        bucket, _, prefix = self.root.partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=older_than_s)
        found, kwargs = [], {"Bucket": bucket, "Prefix": prefix}
        while True:
            page = self._call("list uploads", self.fs.call_s3, "list_multipart_uploads", **kwargs)
            for upload in page.get("Uploads", []):
                if upload["Initiated"] < cutoff:
                    found.append(upload["Key"])
                    if not dry_run:
                        self._call("abort upload", self.fs.call_s3, "abort_multipart_upload", Bucket=bucket,
                                   Key=upload["Key"], UploadId=upload["UploadId"])  # fmt: skip
            if not page.get("IsTruncated"):
                return found
            kwargs.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))

    def part_sizes(self, n: int, *parts: str) -> list[int] | None:
        """Sizes of the n parts of a multipart S3 object (HEAD ?partNumber=i), None if unknown."""
        if not self.remote or not _is_s3(self.fs):
            return None
        bucket, _, key = self.path(*parts).partition("/")
        try:
            return [
                int(self._call("stat", self.fs.call_s3, "head_object", Bucket=bucket, Key=key, PartNumber=i)["ContentLength"])
                for i in range(1, n + 1)
            ]
        except (StoreInputError, FileNotFoundError, KeyError, TypeError):
            return None

    def iter_bytes(self, *parts: str, part_bytes: int = READ_PART_BYTES, parallel: int = READ_PARALLEL) -> Iterator[bytes]:
        """An object's bytes in order, fetched as `parallel` ranged GETs in flight
        (one stream tops out far below a store's bandwidth); each range retried."""
        path = self.path(*parts)
        size = self._call("stat", self.fs.size, path)
        starts = range(0, size, part_bytes)

        def fetch(start: int) -> bytes:
            return self._call("read", self.fs.cat_file, path, start=start, end=min(size, start + part_bytes))

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            window: deque = deque()
            for start in starts:
                window.append(pool.submit(fetch, start))
                if len(window) >= parallel:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()


def _local_create_exclusive(path: str, data: bytes) -> bool:
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
