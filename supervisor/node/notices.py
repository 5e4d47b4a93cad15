"""Preemption notices: a notice file, `supervise stop`'s request, and the clouds'
metadata services.

(SIGTERM/SIGINT are one more source; the wrapper's main thread owns signal
handlers. On Kubernetes the kubelet's SIGTERM never reaches the wrapper: a
preStop hook writes the notice file instead, see supervisor.launch.kubernetes.)
Each cloud is one `MetadataSource` class in `SOURCES`, with a configurable
base URL so tests serve fake notices from loopback. Every source is probed in
its own background thread (Azure's first call may take two minutes), so
nothing waits for a probe: the file and the stop request are watched from the
first moment, and a cloud is polled once its probe answered.

- AWS IMDSv2: PUT /latest/api/token, then GET /latest/meta-data/spot/instance-action
  (404 until a notice; then {"action", "time"}: about 2 minutes ahead), and
  GET /latest/meta-data/events/recommendations/rebalance (404 until EC2 sends a
  rebalance recommendation, then {"noticeTime"}): an *early* notice, which often
  comes before the interruption notice (AWS EC2 User Guide, "EC2 instance
  rebalance recommendations" and "Instance metadata categories").
- GCP: GET /computeMetadata/v1/instance/preempted with `Metadata-Flavor: Google`
  ("TRUE" once preempted; GCP documents 30 s and returns no time).
- Azure Scheduled Events: GET /metadata/scheduledevents with `Metadata: true`;
  an event with EventType "Preempt" carries NotBefore (at least 30 s ahead). The
  first call enables the service for the VM and Azure documents that it can take
  up to two minutes (Azure docs, "Scheduled Events for Linux VMs": enabling and
  disabling Scheduled Events): the probe waits that long, in the background.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path, PurePath
from typing import Callable, ClassVar

log = logging.getLogger(__name__)

GCP_NOTICE_S = 30.0  # GCP's documented preemption notice; its metadata gives no time

STOP = "stop"  # the notice source of `supervise stop`: a request, not a preemption
AWS_REBALANCE = "aws-rebalance"  # an early notice: save at the next step boundary, keep training


@dataclass(frozen=True)
class Notice:
    source: str  # "sigterm", "sigint", "file", "stop" (`supervise stop`), a SOURCES name, "aws-rebalance"
    received_at: float  # UTC epoch seconds
    deadline: float | None  # UTC epoch seconds by which the node goes away, if known

    def as_json(self) -> dict:
        return asdict(self)


# --- how long a notice without deadline waits for the save ---------------------
# A stop request, SIGTERM, SIGINT or a notice file without deadline: the trainer always
# saves, and whoever waits for it (the node wrapper, `supervise stop`) waits as long as
# this run's measured saves say (SaveWait), not a fixed budget.

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


def parse_aws_rebalance(status: int, body: str, now: float) -> Notice | None:
    """A rebalance recommendation ({"noticeTime": ...}) is advice, not a deadline:
    the instance may run on for hours, or the interruption notice may follow."""
    return Notice(AWS_REBALANCE, now, None) if status == 200 and body.strip() else None


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
    """Any file is a notice; JSON {"deadline": epoch} or {"deadline_s": seconds} adds a
    deadline, {"source": name} names who sent it (the Kubernetes preStop hook)."""
    deadline = None
    with contextlib.suppress(ValueError, TypeError):
        data = json.loads(text) if text.strip() else {}
        if isinstance(data, dict):
            if data.get("deadline") is not None:
                deadline = float(data["deadline"])
            elif data.get("deadline_s") is not None:
                deadline = now + float(data["deadline_s"])
            if isinstance(data.get("source"), str) and data["source"]:
                source = data["source"]
    return Notice(source, now, deadline)


def done_marker(notice_file: PurePath) -> PurePath:
    """Where the wrapper says it exited, beside its notice file: the Kubernetes
    preStop hook (supervisor.launch.kubernetes) waits for it before the pod goes."""
    return notice_file.with_name(notice_file.name + ".done")


# --- metadata services: one class per cloud, one line in SOURCES ---------------


def _http(method: str, url: str, headers: dict, timeout: float) -> tuple[int, str, dict]:
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace"), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, "", dict(err.headers or {})


class MetadataSource:
    """One cloud's metadata service. A cloud says how to tell that its service is
    there (`_probe`), how to ask for a notice (`_poll`) and, where it has one, for
    an early notice (`_poll_early`); network trouble is never a notice."""

    name: ClassVar[str]
    default_url: ClassVar[str]
    first_call_s: ClassVar[float] = 0.0  # the probe's timeout, where the first call is slow

    def __init__(self, base_url: str, timeout: float = 1.0):
        self.base = base_url.rstrip("/")
        self.timeout = timeout

    def probe(self) -> bool:
        """Whether this cloud's service answers here (the first call: maybe slow)."""
        try:
            return self._probe(max(self.timeout, self.first_call_s))
        except (OSError, ValueError):
            return False

    def poll(self, now: float | None = None) -> Notice | None:
        """One question for a preemption notice."""
        return self._ask(self._poll, now)

    def poll_early(self, now: float | None = None) -> Notice | None:
        """One question for an early notice: save, keep training."""
        return self._ask(self._poll_early, now)

    def _ask(self, question: Callable[[float], Notice | None], now: float | None) -> Notice | None:
        try:
            return question(time.time() if now is None else now)
        except (OSError, ValueError) as err:
            log.debug("%s metadata poll failed: %s", self.name, err)
            return None

    def _get(self, path: str, headers: dict, timeout: float | None = None) -> tuple[int, str, dict]:
        return _http("GET", f"{self.base}{path}", headers, self.timeout if timeout is None else timeout)

    def _probe(self, timeout: float) -> bool:
        raise NotImplementedError

    def _poll(self, now: float) -> Notice | None:
        raise NotImplementedError

    def _poll_early(self, now: float) -> Notice | None:
        return None


class AwsImds(MetadataSource):
    name, default_url = "aws", "http://169.254.169.254"
    ACTION = "/latest/meta-data/spot/instance-action"
    REBALANCE = "/latest/meta-data/events/recommendations/rebalance"

    def __init__(self, base_url: str, timeout: float = 1.0):
        super().__init__(base_url, timeout)
        self._token: str | None = None

    def _fetch_token(self, timeout: float) -> str:
        status, body, _ = _http(
            "PUT", f"{self.base}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, timeout
        )
        if status != 200 or not body:
            raise OSError(f"IMDSv2 token request answered {status}")
        return body

    def _with_token(self, path: str) -> tuple[int, str]:
        if self._token is None:
            self._token = self._fetch_token(self.timeout)
        status, body, _ = self._get(path, {"X-aws-ec2-metadata-token": self._token})
        if status == 401:  # expired: a new one next time
            self._token = None
        return status, body

    def _probe(self, timeout: float) -> bool:
        self._token = self._fetch_token(timeout)
        return True

    def _poll(self, now: float) -> Notice | None:
        return parse_aws(*self._with_token(self.ACTION), now)

    def _poll_early(self, now: float) -> Notice | None:
        return parse_aws_rebalance(*self._with_token(self.REBALANCE), now)


class GcpMetadata(MetadataSource):
    name, default_url = "gcp", "http://metadata.google.internal"
    HEADERS = {"Metadata-Flavor": "Google"}

    def _probe(self, timeout: float) -> bool:
        status, _, headers = self._get("/computeMetadata/v1/", self.HEADERS, timeout)
        return status == 200 and headers.get("Metadata-Flavor") == "Google"

    def _poll(self, now: float) -> Notice | None:
        status, body, _ = self._get("/computeMetadata/v1/instance/preempted", self.HEADERS)
        return parse_gcp(status, body, now)


class AzureScheduledEvents(MetadataSource):
    name, default_url = "azure", "http://169.254.169.254"
    first_call_s = 150.0  # Azure: the first call enables Scheduled Events, "up to two minutes"
    PATH = "/metadata/scheduledevents?api-version=2020-07-01"
    HEADERS = {"Metadata": "true"}

    def _probe(self, timeout: float) -> bool:
        status, body, _ = self._get(self.PATH, self.HEADERS, timeout)
        return status == 200 and "Events" in body

    def _poll(self, now: float) -> Notice | None:
        return parse_azure(*self._get(self.PATH, self.HEADERS)[:2], now)


SOURCES: dict[str, type[MetadataSource]] = {s.name: s for s in (AwsImds, GcpMetadata, AzureScheduledEvents)}
CLOUDS = tuple(SOURCES)


def url_env(cloud: str) -> str:
    """The variable that points a cloud's metadata client elsewhere (tests: a loopback fake)."""
    return f"SUPERVISE_{cloud.upper()}_METADATA_URL"


def cloud_urls(overrides: dict[str, str | None] | None = None) -> dict[str, str]:
    """Base URL per cloud: explicit option, else SUPERVISE_<CLOUD>_METADATA_URL, else the real one."""
    overrides = overrides or {}
    return {c: overrides.get(c) or os.environ.get(url_env(c)) or s.default_url for c, s in SOURCES.items()}


class Detection:
    """Each source probed in its own daemon thread; `found()` is the first that answered
    (on AWS the Azure probe at the same address gets a 404: only one cloud answers).
    With `retry_s` a probe that fails is tried again (a cloud named by the user)."""

    def __init__(self, sources: list[MetadataSource], retry_s: float | None = None):
        self._found: list[MetadataSource] = []
        self._pending = len(sources)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        for s in sources:
            threading.Thread(target=self._probe, args=(s, retry_s), name=f"notice-probe-{s.name}", daemon=True).start()

    def _probe(self, source: MetadataSource, retry_s: float | None) -> None:
        ok = source.probe()
        while not ok and retry_s is not None and not self._stop.wait(retry_s):
            ok = source.probe()
        with self._lock:
            self._pending -= 1
            if ok:
                self._found.append(source)

    def found(self) -> MetadataSource | None:
        with self._lock:
            return self._found[0] if self._found else None

    def done(self) -> bool:
        with self._lock:
            return self._pending == 0 or bool(self._found)

    def stop(self) -> None:
        self._stop.set()


class NoticeWatcher:
    """Background thread: watches the notice file, the stop request and (once its
    probe answered) the cloud; calls `on_notice` once, with the first notice, then
    stops. `on_early` gets each cloud's early notice once (AWS's rebalance
    recommendation); the watch goes on."""

    def __init__(
        self,
        on_notice: Callable[[Notice], None],
        *,
        notice_file: Path | None = None,
        cloud: str = "auto",  # auto | none | a SOURCES name
        urls: dict[str, str] | None = None,
        poll_s: float = 5.0,
        file_poll_s: float = 0.25,
        stop_url: str | None = None,  # `supervise stop`'s request in the bucket (source "stop")
        on_early: Callable[[Notice], None] | None = None,
    ):
        self.on_notice = on_notice
        self.on_early = on_early
        self.notice_file = notice_file
        self.stop_url = stop_url
        self.cloud = cloud
        self.urls = urls or cloud_urls()
        self.poll_s = poll_s
        self.file_poll_s = min(file_poll_s, poll_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notice-watcher", daemon=True)
        self._detection: Detection | None = None
        self._early_seen = False
        self.poller: MetadataSource | None = None

    def start(self) -> None:
        if self.cloud == "auto":
            self._detection = Detection([s(self.urls[c]) for c, s in SOURCES.items()])
        elif self.cloud in SOURCES:  # named: probed until it answers (Azure's first call enables it)
            self._detection = Detection([SOURCES[self.cloud](self.urls[self.cloud])], retry_s=self.poll_s)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._detection is not None:
            self._detection.stop()
        if self._thread.ident is not None:  # started
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

    def _check_cloud(self) -> Notice | None:
        if self.poller is None and self._detection is not None and (found := self._detection.found()):
            self.poller = found
            log.info("watching %s metadata for preemption notices", found.name)
        if self.poller is None:
            return None
        notice = self.poller.poll()
        if notice is None and self.on_early is not None and not self._early_seen:
            early = self.poller.poll_early()
            if early is not None:
                self._early_seen = True
                self.on_early(early)
        return notice

    def _run(self) -> None:
        next_poll = 0.0
        while not self._stop.is_set():
            notice = self._check_file()
            if notice is None and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.poll_s
                notice = self._check_stop() or self._check_cloud()
            if notice is not None:
                self.on_notice(notice)
                return
            self._stop.wait(self.file_poll_s)
