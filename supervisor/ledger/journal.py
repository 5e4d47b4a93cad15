"""The run ledger: an append-only event journal stored next to the checkpoints.

Layout: `<ledger_url>/<incarnation>/<writer>.<token>.<segment>.jsonl`, one JSON
event per line. Each Journal (one process, one writer, one incarnation) owns its
objects alone — the random token keeps two processes that share a writer name
apart — so writers never contend and no conditional append is needed. Every
emit() rewrites the current segment object in full (an S3 PUT is atomic; local
files are written to a temp file, fsynced and renamed), so an event that emit()
returned for is stored even if the node dies right after. A segment is closed
after `SEGMENT_EVENTS` events, which bounds the rewrite to a few hundred KB.

emit() never raises on store trouble: the event stays in memory and goes out
with the next successful write (a warning is logged). The trainer's journal writes
from a background thread (`background=True`) so a frozen store never stalls a step.
Readers tolerate a missing ledger and corrupt lines or objects, and say what they skipped.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from supervisor.ledger.events import Event, parse_line

log = logging.getLogger(__name__)

SEGMENT_EVENTS = 1000
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_KIND = re.compile(r"^[a-z][a-z0-9_]*$")


def _store(url: str, policy=None):
    """The store's one door to storage (fsspec options, AWS_* env), shared with the catalog."""
    from supervisor.store import retry
    from supervisor.store.fs import Store

    return Store(url, policy or retry.PATIENT)


def _put(store, path: str, data: bytes, healthy: bool) -> None:
    """Write one object under the store's LEDGER_WRITE policy (emit() sits on the training
    path), one try while the store is failing."""
    from supervisor.store import retry

    if not store.remote:
        return _write_local(path, data)
    (retry.LEDGER_WRITE if healthy else retry.ONCE).call(store.fs.pipe_file, path, data)


def _write_local(path: str, data: bytes) -> None:
    """Atomic, durable replace of a local file: a reader or a crash sees old or new, never half."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _safe(name: str) -> str:
    return _SAFE.sub("_", name).strip("._") or "x"


class Journal:
    """Durable event writer for one (writer, incarnation); cheap to create, lazy to connect.

    `background=True` (the trainer's training thread): emit() only queues the event and a
    daemon thread writes it, so a frozen store never stalls a training step; close() (also
    run at interpreter exit, bounded by `CLOSE_WAIT_S`) writes what is still queued. Without
    it, emit() returns once the event is stored (or the store failed)."""

    CLOSE_WAIT_S = 10.0

    def __init__(self, ledger_url: str, writer: str, incarnation: str | None = None, *, background: bool = False):
        self.ledger_url = ledger_url.rstrip("/")
        self.writer = writer
        self.incarnation = incarnation or os.environ.get("SUPERVISE_INCARNATION") or "0"
        self._token = uuid.uuid4().hex[:8]
        self._segment = 0
        self._lines: list[str] = []  # current segment, everything emitted so far in it
        self._stored = 0  # how many of _lines are known to be in the store
        self._seq = 0
        self._store = None
        self._healthy = True
        self._host = socket.gethostname()
        self._lock = threading.Lock()  # _lines, _stored, _segment
        self._writing = threading.Lock()  # one write at a time (the thread, close())
        self._wake = threading.Event() if background else None
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Events emitted but not yet known to be stored."""
        with self._lock:
            return len(self._lines) - self._stored

    def _object_path(self, root: str, segment: int) -> str:
        name = f"{_safe(self.writer)}.{self._token}.{segment:05d}.jsonl"
        return f"{root}/{_safe(self.incarnation)}/{name}"

    def emit(self, kind: str, **fields: Any) -> Event:
        """Record one event; returns it. Stored durably unless the store failed (then retried next emit);
        with background=True, queued for the writer thread."""
        if not _KIND.match(kind):
            raise ValueError(f"event kind must be lower_snake_case, got {kind!r}")
        now = time.time()
        with self._lock:
            self._seq += 1
            event = Event(kind=kind, t=now, time=datetime.fromtimestamp(now, timezone.utc).isoformat(),
                          writer=self.writer, incarnation=self.incarnation, mono=time.monotonic(), seq=self._seq,
                          host=self._host, fields=fields)
            self._lines.append(event.to_line())
        if self._wake is None:
            self.flush()
        else:
            self._start_thread()
            self._wake.set()
        return event

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"ledger-{self.writer}", daemon=True)
            self._thread.start()
            atexit.register(self.close)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self.flush()

    def close(self, timeout: float | None = None) -> bool:
        """Write what is queued, waiting at most `timeout` (default CLOSE_WAIT_S); True when all is stored."""
        if self._wake is None:
            return self.flush()
        done = threading.Thread(target=self.flush, daemon=True)
        done.start()
        done.join(self.CLOSE_WAIT_S if timeout is None else timeout)
        return self.pending == 0

    def flush(self) -> bool:
        """Write the current segment; True when everything emitted is stored."""
        with self._writing:
            with self._lock:
                lines, segment = list(self._lines), self._segment
            if len(lines) == self._stored:
                return True
            data = ("\n".join(lines) + "\n").encode()
            try:
                if self._store is None:
                    self._store = _store(self.ledger_url)
                # while the store is failing, one attempt per write, so training is not slowed down
                _put(self._store, self._object_path(self._store.root, segment), data, self._healthy)
            except Exception as err:  # store trouble of any kind must not stop training
                self._healthy = False
                log.warning("ledger: could not store %d event(s) at %s (%s: %s); will retry on the next event",
                            len(lines) - self._stored, self.ledger_url, type(err).__name__, err)
                return False
            self._healthy = True
            with self._lock:
                self._stored = len(lines)
                if self._stored >= SEGMENT_EVENTS:  # later events start the next segment
                    self._segment += 1
                    self._lines, self._stored = self._lines[len(lines):], 0
                return self._stored == len(self._lines)


def read_events(ledger_url: str, policy=None) -> tuple[list[Event], list[str]]:
    """All events under `ledger_url`, sorted by time, and a list of what could not be read.

    A missing ledger is not an error: it gives ([], ["no journal at ..."]). `policy`:
    the store's retry policy (default PATIENT; views at a terminal pass BRIEF).
    """
    problems: list[str] = []
    try:
        store = _store(ledger_url.rstrip("/"), policy)
        fs, root = store.fs, store.root
        paths = sorted(p for p in store.policy.call(fs.find, root) if p.endswith(".jsonl"))
    except FileNotFoundError:
        paths = []
    except Exception as err:
        return [], [f"cannot list the journal at {ledger_url}: {type(err).__name__}: {err}"]
    if not paths:
        return [], [f"no journal at {ledger_url}"]
    events: list[Event] = []
    for path in paths:
        short = path[len(root.rstrip("/")) + 1:] if path.startswith(root) else path
        try:
            text = store.policy.call(fs.cat_file, path).decode("utf-8", errors="replace")
        except Exception as err:
            problems.append(f"{short}: unreadable ({err})")
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                events.append(parse_line(line))
            except ValueError as err:
                problems.append(f"{short}:{number}: skipped corrupt event ({err})")
    events.sort(key=lambda e: (e.t, e.writer, e.seq))
    return events, problems
