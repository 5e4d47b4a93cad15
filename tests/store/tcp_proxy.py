"""A loopback TCP proxy that injects network faults in front of a real server.

Faults apply per new connection, in order: `reset(n)` resets the next n
connections at once (RST), `unavailable(n)` answers the first request of the
next n connections with an S3 `503 SlowDown` and closes, `delay_s` sleeps
before forwarding every chunk. `requests` counts HTTP requests sent upstream
(request lines seen client->server), which the benchmark uses too, and
`seen` keeps them ("GET /bucket/key?query"); `to_client_bytes` counts every
byte sent server->client (what clients received).

Rewrites stand in for stores this machine does not have: `deny(regex)`
answers matching requests (e.g. PUTs of `_COMMIT.json`) with `403 AccessDenied`
without forwarding them, like a bucket policy that forbids those keys;
`answer(regex, response)` answers matching requests with a canned response
(e.g. AWS's GetBucketLocation of a bucket in eu-central-1, which SeaweedFS
always answers with an empty LocationConstraint);
`ignore_preconditions` turns the server's `412 Precondition Failed` into `200 OK`,
like an S3-compatible store that ignores `If-None-Match`.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from collections import deque

_REQUEST_LINE = re.compile(rb"(?:^|\r\n)((?:GET|PUT|POST|HEAD|DELETE) [^ ]+) HTTP/1\.[01]\r\n")
_BODY = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
_DENIED_BODY = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
_DENIED = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_DENIED_BODY), _DENIED_BODY)
)
_OK = b'HTTP/1.1 200 OK\r\nETag: "0"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n'
_SLOWDOWN = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


class FaultProxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1"):
        self.upstream = (host, upstream_port)
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://{host}:{self.port}"
        self.delay_s = 0.0
        self.requests = 0
        self.to_client_bytes = 0
        self.seen: list[str] = []
        self.denied = 0
        self.ignore_preconditions = False
        self._deny: re.Pattern | None = None
        self._answers: list[tuple[re.Pattern, bytes]] = []
        self.connections = 0
        self._faults: deque[str] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._socks: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self, n: int) -> None:
        self._faults.extend(["reset"] * n)

    def unavailable(self, n: int) -> None:
        self._faults.extend(["503"] * n)

    def deny(self, request_regex: bytes | None) -> None:
        """403 for requests whose request line matches (None: stop denying)."""
        self._deny = re.compile(request_regex) if request_regex else None

    def answer(self, request_regex: bytes, response: bytes) -> None:
        """Answer requests whose request line matches with `response` (a whole HTTP
        response that closes the connection), without forwarding them."""
        self._answers.append((re.compile(request_regex), response))

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for s in list(self._socks):
            _close(s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                fault = self._faults.popleft() if self._faults else None
            if fault == "reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client, fault), daemon=True).start()

    def _serve(self, client: socket.socket, fault: str | None) -> None:
        if fault == "503":
            try:
                client.recv(65536)
                client.sendall(_SLOWDOWN)
            finally:
                _close(client)
            return
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            _close(client)
            return
        self._socks |= {client, upstream}
        threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
        self._pipe(upstream, client, False)

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if count:
                    if self._deny is not None and self._deny.search(data):
                        with self._lock:
                            self.denied += 1
                        src.sendall(_DENIED)
                        break
                    lines = [m.group(1).decode() for m in _REQUEST_LINE.finditer(data)]
                    with self._lock:
                        self.requests += len(lines)
                        self.seen += lines
                    canned = next((r for pattern, r in self._answers if pattern.search(data)), None)
                    if canned is not None:
                        src.sendall(canned)
                        break
                elif self.ignore_preconditions and data.startswith(b"HTTP/1.1 412 "):
                    dst.sendall(_OK)  # the error and its body dropped; the connection closed
                    with self._lock:
                        self.to_client_bytes += len(_OK)
                    break
                else:
                    with self._lock:
                        self.to_client_bytes += len(data)
                if self.delay_s:
                    time.sleep(self.delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _close(s)
                self._socks.discard(s)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
