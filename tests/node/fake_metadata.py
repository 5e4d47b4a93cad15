"""Loopback fakes of the AWS IMDSv2, GCP and Azure metadata services, speaking
just the requests `supervisor.node.notices` makes (paths and headers as the
clouds document them). `preempt()` turns the notice on; `rebalance()` turns on
AWS's rebalance recommendation (an early notice). `first_call_delay_s` stands in
for Azure's first Scheduled Events call, which enables the service and may take
up to two minutes."""

from __future__ import annotations

import json
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeMetadata:
    def __init__(self, cloud: str, first_call_delay_s: float = 0.0):
        self.cloud = cloud
        self.deadline: float | None = None  # set by preempt()
        self.rebalance_at: float | None = None  # set by rebalance()
        self.first_call_delay_s = first_call_delay_s
        self.requests: list[tuple[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: str = "", headers: dict | None = None):
                data = body.encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                fake.requests.append(("PUT", self.path))
                if fake.cloud == "aws" and self.path == "/latest/api/token":
                    if self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                        return self._send(200, "tok-123")
                    return self._send(400)
                self._send(404)

            def do_GET(self):
                fake.requests.append(("GET", self.path))
                if len(fake.requests) == 1 and fake.first_call_delay_s:
                    time.sleep(fake.first_call_delay_s)
                if fake.cloud == "aws" and self.path == "/latest/meta-data/events/recommendations/rebalance":
                    if self.headers.get("X-aws-ec2-metadata-token") != "tok-123":
                        return self._send(401)
                    if fake.rebalance_at is None:
                        return self._send(404)
                    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(fake.rebalance_at))
                    return self._send(200, json.dumps({"noticeTime": when}))
                if fake.cloud == "aws" and self.path == "/latest/meta-data/spot/instance-action":
                    if self.headers.get("X-aws-ec2-metadata-token") != "tok-123":
                        return self._send(401)
                    if fake.deadline is None:
                        return self._send(404)
                    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(fake.deadline))
                    return self._send(200, json.dumps({"action": "terminate", "time": when}))
                if fake.cloud == "gcp" and self.path.startswith("/computeMetadata/v1/"):
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._send(403)
                    flavor = {"Metadata-Flavor": "Google"}
                    if self.path == "/computeMetadata/v1/instance/preempted":
                        return self._send(200, "TRUE" if fake.deadline else "FALSE", flavor)
                    return self._send(200, "instance/\n", flavor)
                if fake.cloud == "azure" and self.path.startswith("/metadata/scheduledevents"):
                    if self.headers.get("Metadata") != "true":
                        return self._send(400)
                    events = []
                    if fake.deadline is not None:
                        events.append({
                            "EventId": "e1", "EventType": "Preempt", "ResourceType": "VirtualMachine",
                            "Resources": ["vm0"], "EventStatus": "Scheduled",
                            "NotBefore": formatdate(fake.deadline, usegmt=True),
                        })  # fmt: skip
                    return self._send(200, json.dumps({"DocumentIncarnation": 1, "Events": events}))
                self._send(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def preempt(self, in_s: float = 120.0) -> None:
        self.deadline = time.time() + in_s

    def rebalance(self) -> None:
        self.rebalance_at = time.time()

    def __enter__(self) -> FakeMetadata:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_url() -> str:
    """A loopback URL where nothing listens (connection refused at once)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def urls_for(fake: FakeMetadata | None) -> dict[str, str]:
    """Base URLs for all three clouds: the fake for its cloud, closed ports for the others."""
    urls = {c: closed_url() for c in ("aws", "gcp", "azure")}
    if fake is not None:
        urls[fake.cloud] = fake.url
    return urls
