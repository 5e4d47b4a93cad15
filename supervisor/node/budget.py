"""Progress-bounded restarts: how a retry loop ends when SkyPilot would not end it.

SkyPilot restarts a code listed in `recover_on_exit_codes` (75, 69) without
limit (`sky/jobs/recovery_strategy.py`, `StrategyExecutor.should_restart_on_failure`),
and `supervise start` renders `max_restarts_on_errors: 0` so that 78 is never
retried. A crash or hang loop (69 after 69) would therefore re-provision a
cluster forever. The wrapper bounds it by progress instead: it keeps a small
record next to the ledger, `<checkpoints>/_supervise/restarts.json` (a `_`
folder: the catalog, retention and TorchTitan ignore it), and a start that
finds K consecutive incarnations that failed (69) on a healthy cluster without
a new committed step exits 78. A preemption never counts, whatever its exit
code: an incarnation that got a notice (SIGTERM, a notice file, cloud
metadata; also the survivor of a partial preemption, whose SIGTERM comes at
its peers' loss or at OS shutdown), whose node vanished, or in which a peer
node got a notice before anything failed, is recorded `preempted` with its
`cause`; the first trouble anywhere in the cluster decides (`first_cause`).
A recorded 78 for the same config short-circuits the next start.

The rules are plain functions of the record (a dict); `RestartRecord` is the
I/O at the edge, through the catalog's store and its retry policy. Only node
rank 0 writes it (nodes > 0 write their own `PeerMarks`); every node reads the
same record and marks and reaches the same verdict.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from supervisor.contract.layout import NODE_MARKS, RESTARTS, node_mark
from supervisor.contract.exitcodes import ExitCode
from supervisor.node.notices import STOP
from supervisor.titan_config import strip_node_owned

if TYPE_CHECKING:
    from supervisor.store.fs import Store

log = logging.getLogger(__name__)

NOTICE, FAILURE = "notice", "failure"  # kinds of trouble
CLOCK_SKEW_S = 5.0  # nodes' clocks (NTP) agree better than this
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


def cause_of(code: int | None, notice: str | None) -> tuple[bool, str]:
    """(preempted, cause) of an incarnation from its node's own view. Any notice
    but `supervise stop`'s is a preemption whatever the code (a notice whose save
    could not finish exits 69), and so is a node that vanished."""
    if code is None:
        return True, "node lost: no exit recorded (VM reclaimed or killed)"
    if notice and notice != STOP:
        return True, f"preemption notice ({notice})"
    if code == ExitCode.RETRYABLE:
        return False, "failure on a healthy cluster"
    return False, {ExitCode.FINISHED: "finished", ExitCode.USER_ERROR: "config error or gave up"}.get(code, f"exit {code}")


def close_open(record: dict, step: int | None) -> dict:
    """An incarnation without a recorded end vanished (VM lost, SIGKILL): a
    preemption, with the newest committed step found now as its end."""
    for inc in record["incarnations"]:
        if "code" not in inc:
            preempted, cause = cause_of(None, None)
            inc.update(code=None, reason=LOST, end_step=step, ended=None, preempted=preempted, cause=cause)
    return record


def counts(inc: dict) -> bool:
    """Whether an incarnation spends the budget: a 69 that was no preemption."""
    return inc.get("code") == ExitCode.RETRYABLE and not inc.get("preempted")


def no_progress_streak(incarnations: list[dict], current_step: int | None) -> list[dict]:
    """The newest run of incarnations that failed (69) on a healthy cluster without
    a new committed step (newest first). Progress anywhere ends the run; other
    exits without progress (preemptions of any code, a lost node, a 75) neither
    count nor break it."""
    streak = []
    later_start = current_step
    for inc in reversed(incarnations):
        end = max(_rank(inc.get("end_step")), _rank(later_start))
        if end > _rank(inc.get("start_step")):
            break
        if counts(inc):
            streak.append(inc)
        later_start = inc.get("start_step")
    return streak


def streak_view(record: dict | None, current_step: int | None) -> dict | None:
    """What `supervise status` shows: the streak now and the preemptions recorded."""
    if not record or not isinstance(record.get("incarnations"), list):
        return None
    streak = no_progress_streak(record["incarnations"], current_step)
    return {
        "streak": len(streak),
        "last_error": streak[0].get("reason") if streak else None,
        "preemptions": sum(1 for inc in record["incarnations"] if inc.get("preempted")),
        "gave_up": (record.get("fatal") or {}).get("reason"),
    }


def first_cause(record: dict, marks: list[dict]) -> dict:
    """Amend the newest incarnation, a 69, with what its peers saw: the first trouble
    anywhere in the cluster decides. A peer's notice before this node's failure:
    the survivor of a partial preemption (its collectives failed), not counted. A
    peer's failure before this node's notice: a crash, whose survivors SkyPilot
    then stops with SIGTERM (sky/skylet/subprocess_daemon.py), counted.
    `marks`: each peer's newest trouble (`{"node", "kind", "what", "at", "since"}`,
    PeerMarks); one whose start (`since`) precedes this incarnation's is an older one's."""
    incs = record["incarnations"]
    inc = incs[-1] if incs else None
    if inc is None or inc.get("code") != ExitCode.RETRYABLE or None in (inc.get("started_at"), inc.get("trouble_at")):
        return record
    own_preempted, own_cause = cause_of(inc["code"], inc.get("notice"))
    own = {"kind": NOTICE if own_preempted else FAILURE, "at": inc["trouble_at"]}
    during = [m for m in marks if isinstance(m.get("at"), (int, float)) and isinstance(m.get("since"), (int, float))
              and m["since"] >= inc["started_at"] - CLOCK_SKEW_S]  # fmt: skip
    first = min([own, *during], key=lambda m: m["at"])  # ties: this node's own view
    if first is own:
        inc.update(preempted=own_preempted, cause=own_cause)
    elif first.get("kind") == NOTICE:
        inc.update(preempted=True, cause=f"peer node {first.get('node')} got a preemption notice ({first.get('what')})")
    else:
        inc.update(preempted=False, cause=f"peer node {first.get('node')} failed first: {first.get('what')}")
    return record


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


def begin(record: dict, incarnation: str, step: int | None, started_at: float | None = None) -> dict:
    """Open this incarnation (`started_at`: epoch seconds, to match peers' notices)."""
    new = {"id": incarnation, "started": _now(), "started_at": time.time() if started_at is None else started_at,
           "start_step": step}
    record["incarnations"] = [*record["incarnations"], new][-KEEP:]
    return record


def end(record: dict, incarnation: str, code: int, reason: str, step: int | None, notice: str | None = None,
        trouble_at: float | None = None) -> dict:
    """Close this incarnation, saying whether a preemption ended it (`notice`: the
    source of the notice this node got; `trouble_at`: when it got it, or saw the
    failure); a 78 becomes the record's verdict for this config."""
    preempted, cause = cause_of(int(code), notice)
    for inc in record["incarnations"]:
        if inc.get("id") == incarnation:
            inc.update(code=int(code), reason=reason, end_step=step, ended=_now(), preempted=preempted, cause=cause,
                       notice=notice, trouble_at=trouble_at)
    if code == ExitCode.USER_ERROR:
        record["fatal"] = {"reason": reason, "time": _now()}
    return record


class RestartRecord:
    """`<checkpoints>/_supervise/restarts.json`, read and written through the catalog's store."""

    def __init__(self, store: Store):
        self.store = store  # the catalog's: one client, one retry policy
        self.url = self.store.url_of(*RESTARTS)

    def load(self) -> dict | None:
        """The stored record; None when there is none. An unreadable one is started over."""
        try:
            data = json.loads(self.store.cat(*RESTARTS))
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("ignoring unreadable restart record %s", self.url)
            return None
        return data if isinstance(data, dict) and isinstance(data.get("incarnations"), list) else None

    def save(self, record: dict) -> None:
        self.store.put(json.dumps(record, indent=1).encode(), *RESTARTS)


class PeerMarks:
    """`<checkpoints>/_supervise/nodes/node-R.json`: how node R > 0's newest
    incarnation went wrong first (a notice, or a failure without one) and when;
    node 0's are in the record. One object per node, so writers never contend;
    node 0's next start reads them (`first_cause`)."""

    def __init__(self, store: Store):
        self.store = store

    def write(self, node: int, kind: str, what: str, at: float, since: float) -> None:
        """`at`: when it went wrong; `since`: when this node's incarnation started."""
        mark = {"node": node, "kind": kind, "what": what, "at": at, "since": since}
        self.store.put(json.dumps(mark).encode(), *node_mark(node))

    def read(self) -> list[dict]:
        """Every node's newest mark; unreadable ones are skipped."""
        marks = []
        for name in sorted(self.store.listdir(*NODE_MARKS)):
            try:
                mark = json.loads(self.store.cat(*NODE_MARKS, name))
            except (FileNotFoundError, ValueError):
                continue
            if isinstance(mark, dict):
                marks.append(mark)
        return marks
