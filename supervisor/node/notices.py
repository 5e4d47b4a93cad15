"""Preemption notices: a notice file and the three clouds' metadata services.

(SIGTERM/SIGINT are the fourth source; the wrapper's main thread owns signal
handlers.) Each cloud has a configurable base URL so tests serve fake notices
from loopback; the cloud is auto-detected in the background and the watcher
stays quiet where no metadata server answers.

- AWS IMDSv2: PUT /latest/api/token, then GET /latest/meta-data/spot/instance-action
  (404 until a notice; then {"action", "time"}: about 2 minutes ahead).
- GCP: GET /computeMetadata/v1/instance/preempted with `Metadata-Flavor: Google`
  ("TRUE" once preempted; GCP documents 30 s and returns no time).
- Azure Scheduled Events: GET /metadata/scheduledevents with `Metadata: true`;
  an event with EventType "Preempt" carries NotBefore (at least 30 s ahead).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

GCP_NOTICE_S = 30.0  # GCP's documented preemption notice; its metadata gives no time

DEFAULT_URLS = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}
URL_ENV = {
    "aws": "SUPERVISE_AWS_METADATA_URL",
    "gcp": "SUPERVISE_GCP_METADATA_URL",
    "azure": "SUPERVISE_AZURE_METADATA_URL",
}
CLOUDS = ("aws", "gcp", "azure")


STOP = "stop"  # the notice source of `supervise stop`: a request, not a preemption


@dataclass(frozen=True)
class Notice:
    source: str  # "sigterm", "sigint", "file", "stop" (`supervise stop`), "aws", "gcp", "azure"
    received_at: float  # UTC epoch seconds
    deadline: float | None  # UTC epoch seconds by which the node goes away, if known

    def as_json(self) -> dict:
        return asdict(self)


# --- how long a notice without deadline waits for the save ---------------------
#
# A stop request (and SIGTERM, SIGINT, a notice file without deadline) gives no
# cloud deadline: the trainer always saves. Whoever waits for it (the node
# wrapper before it kills the workers; `supervise stop` before it cancels) waits
# as long as this run's measured saves say a save needs, not a fixed budget, and
# longer while the trainer keeps reporting saves and commits (ledger events).

SAVE_WAIT_FACTOR = 3.0  # a save under load (a throttled store) may take this much longer than measured
SAVE_WAIT_SLACK_S = 60.0  # the step boundary before the save, the exit after it
SAVE_EVENTS = ("checkpoint_saved", "checkpoint_uploaded", "checkpoint_committed")


def measured_save_s(events) -> float | None:
    """The longest save + commit of one step this run measured, from the ledger's
    durations: `checkpoint_saved` (the loop blocked) or, for an async save, the
    longer `checkpoint_uploaded` (its upload done), plus `checkpoint_committed`.
    None before any."""
    per_step: dict[tuple, dict[str, float]] = {}
    for e in events:
        seconds = e.get("duration_s") if e.kind in SAVE_EVENTS else None
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
            parts = per_step.setdefault((e.incarnation, e.writer, e.get("step")), {})
            parts[e.kind] = parts.get(e.kind, 0.0) + max(float(seconds), 0.0)
    totals = [max(p.get("checkpoint_saved", 0.0), p.get("checkpoint_uploaded", 0.0)) + p.get("checkpoint_committed", 0.0)
              for p in per_step.values()]
    return max(totals) if totals else None


def save_wait_s(floor_s: float, measured_s: float | None, unmeasured_s: float) -> float:
    """Seconds to wait for a save: `SAVE_WAIT_FACTOR` x the measured save + slack,
    never under `floor_s`; `unmeasured_s` (the hang timeout: no wait longer than a
    silent trainer gets anyway) before any save was measured."""
    if measured_s is None:
        return max(floor_s, unmeasured_s)
    return max(floor_s, SAVE_WAIT_FACTOR * measured_s + SAVE_WAIT_SLACK_S)


class SaveWait:
    """When to give up on a save asked for without deadline (no I/O: fed the
    ledger's events and the clock). Every new save or commit event is progress
    and starts the wait again, so a save + commit that the measurement
    underestimated is not cut off while it visibly advances."""

    def __init__(self, floor_s: float, unmeasured_s: float, now: float):
        self.floor_s, self.unmeasured_s = floor_s, unmeasured_s
        self.measured_s: float | None = None
        self.last_progress = now
        self._seen: int | None = None  # save/commit events seen at the first look

    def observe(self, events, now: float) -> bool:
        """Feed the ledger's events; True when they show new save/commit progress."""
        events = list(events)
        self.measured_s = measured_save_s(events)
        count = sum(1 for e in events if e.kind in SAVE_EVENTS)
        progressed = self._seen is not None and count > self._seen
        self._seen = count if self._seen is None else max(count, self._seen)
        if progressed:
            self.last_progress = now
        return progressed

    @property
    def wait_s(self) -> float:
        return save_wait_s(self.floor_s, self.measured_s, self.unmeasured_s)

    @property
    def give_up_at(self) -> float:
        return self.last_progress + self.wait_s

    def describe(self) -> str:
        if self.measured_s is None:
            return f"no save measured yet in this run: waiting up to {self.wait_s:.0f} s"
        return f"measured save + commit {self.measured_s:.1f} s: waiting up to {self.wait_s:.0f} s"


# --- pure parsers: (HTTP status, body, now) -> Notice | None -----------------


def parse_aws(status: int, body: str, now: float) -> Notice | None:
    if status != 200:
        return None
    try:
        action = json.loads(body)
        deadline = datetime.fromisoformat(action["time"].replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError, AttributeError):
        deadline = now + 120.0  # AWS's documented two minutes
    return Notice("aws", now, deadline)


def parse_gcp(status: int, body: str, now: float) -> Notice | None:
    if status != 200 or body.strip().upper() != "TRUE":
        return None
    return Notice("gcp", now, now + GCP_NOTICE_S)


def parse_azure(status: int, body: str, now: float) -> Notice | None:
    if status != 200:
        return None
    try:
        events = json.loads(body).get("Events") or []
    except (ValueError, AttributeError):
        return None
    for event in events:
        if isinstance(event, dict) and event.get("EventType") == "Preempt":
            try:
                deadline = parsedate_to_datetime(event.get("NotBefore", "")).timestamp()
            except (TypeError, ValueError, IndexError):
                deadline = now + 30.0  # Azure's documented minimum notice
            return Notice("azure", now, deadline)
    return None


def parse_notice_file(text: str, now: float, source: str = "file") -> Notice:
    """Any file is a notice; JSON {"deadline": epoch} or {"deadline_s": seconds} adds a deadline."""
    deadline = None
    try:
        data = json.loads(text) if text.strip() else {}
        if isinstance(data, dict):
            if data.get("deadline") is not None:
                deadline = float(data["deadline"])
            elif data.get("deadline_s") is not None:
                deadline = now + float(data["deadline_s"])
    except (ValueError, TypeError):
        pass
    return Notice(source, now, deadline)


# --- metadata clients ---------------------------------------------------------


def _http(method: str, url: str, headers: dict, timeout: float) -> tuple[int, str, dict]:
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace"), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, "", dict(err.headers or {})


class CloudPoller:
    """One cloud's metadata service: `probe()` says whether it is there, `poll()` asks for a notice."""

    def __init__(self, cloud: str, base_url: str, timeout: float = 1.0):
        self.cloud = cloud
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self._token: str | None = None

    def _aws_token(self) -> str:
        status, body, _ = _http(
            "PUT", f"{self.base}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, self.timeout
        )
        if status != 200 or not body:
            raise OSError(f"IMDSv2 token request answered {status}")
        return body

    def probe(self) -> bool:
        try:
            if self.cloud == "aws":
                self._token = self._aws_token()
                return True
            if self.cloud == "gcp":
                status, _, headers = _http(
                    "GET", f"{self.base}/computeMetadata/v1/", {"Metadata-Flavor": "Google"}, self.timeout
                )
                return status == 200 and headers.get("Metadata-Flavor") == "Google"
            status, body, _ = self._azure()
            return status == 200 and "Events" in body
        except (OSError, ValueError):
            return False

    def _azure(self) -> tuple[int, str, dict]:
        url = f"{self.base}/metadata/scheduledevents?api-version=2020-07-01"
        return _http("GET", url, {"Metadata": "true"}, self.timeout)

    def poll(self, now: float | None = None) -> Notice | None:
        """One question to the service; network trouble is no notice (logged at debug)."""
        now = time.time() if now is None else now
        try:
            if self.cloud == "aws":
                if self._token is None:
                    self._token = self._aws_token()
                url = f"{self.base}/latest/meta-data/spot/instance-action"
                status, body, _ = _http("GET", url, {"X-aws-ec2-metadata-token": self._token}, self.timeout)
                if status == 401:
                    self._token = None
                return parse_aws(status, body, now)
            if self.cloud == "gcp":
                url = f"{self.base}/computeMetadata/v1/instance/preempted"
                status, body, _ = _http("GET", url, {"Metadata-Flavor": "Google"}, self.timeout)
                return parse_gcp(status, body, now)
            status, body, _ = self._azure()
            return parse_azure(status, body, now)
        except (OSError, ValueError) as err:
            log.debug("%s metadata poll failed: %s", self.cloud, err)
            return None


def cloud_urls(overrides: dict[str, str | None] | None = None) -> dict[str, str]:
    """Base URL per cloud: explicit option, else SUPERVISE_<CLOUD>_METADATA_URL, else the real one."""
    overrides = overrides or {}
    return {c: overrides.get(c) or os.environ.get(URL_ENV[c]) or DEFAULT_URLS[c] for c in CLOUDS}


def detect(urls: dict[str, str], timeout: float = 1.0) -> CloudPoller | None:
    """The first cloud whose metadata service answers (probed in parallel), or None."""
    pollers = [CloudPoller(c, urls[c], timeout) for c in CLOUDS]
    results: dict[str, bool] = {}
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(p.cloud, p.probe()), daemon=True) for p in pollers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 3 + 1)
    return next((p for p in pollers if results.get(p.cloud)), None)


class NoticeWatcher:
    """Background thread: watches the notice file and (once detected) the cloud;
    calls `on_notice` once, with the first notice, then stops."""

    def __init__(
        self,
        on_notice: Callable[[Notice], None],
        *,
        notice_file: Path | None = None,
        cloud: str = "auto",  # auto | aws | gcp | azure | none
        urls: dict[str, str] | None = None,
        poll_s: float = 5.0,
        file_poll_s: float = 0.25,
        stop_url: str | None = None,  # `supervise stop`'s request in the bucket (source "stop")
    ):
        self.on_notice = on_notice
        self.notice_file = notice_file
        self.stop_url = stop_url
        self.cloud = cloud
        self.urls = urls or cloud_urls()
        self.poll_s = poll_s
        self.file_poll_s = min(file_poll_s, poll_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notice-watcher", daemon=True)
        self.poller: CloudPoller | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _check_file(self) -> Notice | None:
        if self.notice_file is None or not self.notice_file.exists():
            return None
        try:
            text = self.notice_file.read_text()
            self.notice_file.unlink()  # consumed: the restart must not see it again
        except OSError:
            text = ""
        return parse_notice_file(text, time.time())

    def _check_stop(self) -> Notice | None:
        """The stop request stays in the bucket: every node, and a restart, must see it.
        Its content does not matter: any object there is a request."""
        if not self.stop_url:
            return None
        try:
            from supervisor.store.fs import Store

            folder, _, name = self.stop_url.rpartition("/")
            Store(folder).cat(name)
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 - a store hiccup is no notice
            log.debug("stop request %s unreadable: %s", self.stop_url, err)
            return None
        # No deadline, whatever the request says (an older `supervise stop` wrote a fixed
        # 900 s budget): nothing reclaims the machine, so the trainer always saves.
        return Notice(STOP, time.time(), None)

    def _run(self) -> None:
        if self.cloud == "auto":
            self.poller = detect(self.urls)
            if self.poller:
                log.info("watching %s metadata for preemption notices", self.poller.cloud)
        elif self.cloud in CLOUDS:
            self.poller = CloudPoller(self.cloud, self.urls[self.cloud])
        next_poll = 0.0
        while not self._stop.is_set():
            notice = self._check_file()
            if notice is None and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.poll_s
                notice = self._check_stop()
                if notice is None and self.poller is not None:
                    notice = self.poller.poll()
            if notice is not None:
                self.on_notice(notice)
                return
            self._stop.wait(self.file_poll_s)
