"""Progress-bounded restarts: how a retry loop ends when SkyPilot would not end it.

SkyPilot restarts a code listed in `recover_on_exit_codes` (75, 69) without
limit (`sky/jobs/recovery_strategy.py`, `StrategyExecutor.should_restart_on_failure`),
and `supervise start` renders `max_restarts_on_errors: 0` so that 78 is never
retried. A crash or hang loop (69 after 69) would therefore re-provision a
cluster forever. The wrapper bounds it by progress instead: it keeps a small
record next to the ledger, `<checkpoints>/_supervise/restarts.json` (a `_`
folder: the catalog, retention and TorchTitan ignore it), and a start that
finds K consecutive incarnations that ended 69 without a new committed step
exits 78. A recorded 78 for the same config short-circuits the next start.

The rules are plain functions of the record (a dict); `RestartRecord` is the
I/O at the edge, through the catalog's store and its retry policy. Only node
rank 0 writes; every node reads the same record and reaches the same verdict.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from supervisor.exitcodes import ExitCode
from supervisor.titan_config import strip_node_owned

if TYPE_CHECKING:
    from supervisor.store.fs import Store

log = logging.getLogger(__name__)

RECORD_DIR = "_supervise"
RECORD_NAME = "restarts.json"
DEFAULT_MAX_RESTARTS_WITHOUT_PROGRESS = 3
KEEP = 50  # newest incarnations kept in the record; the ledger keeps the full history
LOST = "no exit recorded (node lost or killed)"


def config_hash(trainer_args: list[str]) -> str:
    """The job's TorchTitan config: its args minus the flags the node wrapper owns."""
    return hashlib.sha256(json.dumps(strip_node_owned(trainer_args)).encode()).hexdigest()[:16]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _rank(step: int | None) -> int:
    return -1 if step is None else step


def for_config(record: dict | None, chash: str) -> dict:
    """The record of this config; a changed config (or none yet) starts over."""
    if record and record.get("config_hash") == chash:
        return record
    return {"config_hash": chash, "incarnations": [], "fatal": None, "args_ok": None}


def close_open(record: dict, step: int | None) -> dict:
    """An incarnation without a recorded end vanished (VM lost, SIGKILL): it ends
    neutral, with the newest committed step found now as its end."""
    for inc in record["incarnations"]:
        if "code" not in inc:
            inc.update(code=None, reason=LOST, end_step=step, ended=None)
    return record


def no_progress_streak(incarnations: list[dict], current_step: int | None) -> list[dict]:
    """The newest run of incarnations that ended 69 without a new committed step
    (newest first). Progress anywhere ends the run; other exits without progress
    (a lost node, a 75) neither count nor break it."""
    streak = []
    later_start = current_step
    for inc in reversed(incarnations):
        end = max(_rank(inc.get("end_step")), _rank(later_start))
        if end > _rank(inc.get("start_step")):
            break
        if inc.get("code") == ExitCode.RETRYABLE:
            streak.append(inc)
        later_start = inc.get("start_step")
    return streak


@dataclass
class Verdict:
    give_up: bool
    reason: str = ""
    earlier: bool = False  # the 78 was recorded by an earlier start


def decide_start(record: dict, current_step: int | None, limit: int) -> Verdict:
    """May this start train? `limit` K: give up after K no-progress 69s (0: never)."""
    fatal = record.get("fatal")
    if fatal:
        return Verdict(True, fatal["reason"], earlier=True)
    streak = no_progress_streak(record["incarnations"], current_step)
    if limit > 0 and len(streak) >= limit:
        return Verdict(True, f"gave up: {len(streak)} restarts without a new checkpoint; last error: {streak[0].get('reason')}")
    return Verdict(False)


def begin(record: dict, incarnation: str, step: int | None) -> dict:
    record["incarnations"] = [*record["incarnations"], {"id": incarnation, "started": _now(), "start_step": step}][-KEEP:]
    return record


def end(record: dict, incarnation: str, code: int, reason: str, step: int | None) -> dict:
    """Close this incarnation; a 78 becomes the record's verdict for this config."""
    for inc in record["incarnations"]:
        if inc.get("id") == incarnation:
            inc.update(code=int(code), reason=reason, end_step=step, ended=_now())
    if code == ExitCode.USER_ERROR:
        record["fatal"] = {"reason": reason, "time": _now()}
    return record


class RestartRecord:
    """`<checkpoints>/_supervise/restarts.json`, read and written through the catalog's store."""

    def __init__(self, store: Store):
        self.store = store  # the catalog's: one client, one retry policy
        self.url = self.store.url_of(RECORD_DIR, RECORD_NAME)

    def load(self) -> dict | None:
        """The stored record; None when there is none. An unreadable one is started over."""
        try:
            data = json.loads(self.store.cat(RECORD_DIR, RECORD_NAME))
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("ignoring unreadable restart record %s", self.url)
            return None
        return data if isinstance(data, dict) and isinstance(data.get("incarnations"), list) else None

    def save(self, record: dict) -> None:
        data = json.dumps(record, indent=1).encode()
        if not self.store.remote:
            os.makedirs(os.path.dirname(self.store.path(RECORD_DIR, RECORD_NAME)), exist_ok=True)
        self.store.put(data, RECORD_DIR, RECORD_NAME)
