"""The one ledger every view reads: the run's journal, its newest run, the backend's own
record, and the node losses nobody wrote down.

`status` (goodput), `checkpoint.interval: auto` (on the node) and `report` all read a
run through `run_events`, so they count the same interruptions the same way on every
backend:

- **One run at a time.** A job stopped and started again under the same name writes
  into the same journal; each `supervise start` begins with a `launch` event. The
  views cover the newest run and say so (`runs`), instead of silently mixing or
  cutting them.
- **The backend's record.** SkyPilot's transitions (ledger.skypilot.job_events) are
  merged in where the caller has them (`report`: queue, provisioning, detection).
- **A node lost without a word** is a preemption without notice. The local emulator
  sees its node's process group die and writes `preempted` itself; on SkyPilot nobody
  can: the VM is gone with its wrapper. What the journal shows is a node start with
  no `exit` of its own, followed by the next start of that node. `lost_nodes` adds
  the `preempted` event such a node could not write, at its last sign of life, when
  nothing else explains the end: no node of that start reported an exit (a node
  that exits non-zero takes its peers down with it: SkyPilot's get_or_fail, srun's
  --kill-on-bad-exit, the emulator's teardown), or SkyPilot's RECOVERING row says the
  cluster was lost rather than the job failing (sky/jobs/controller.py: cluster not
  UP; a user-job failure's row carries code USER_JOB_FAILURE, sky/jobs/state.py
  set_recovering). A start that already has a `preempted` (the emulator's) is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from supervisor.ledger.events import Event
from supervisor.ledger.skypilot import WRITER as SKYPILOT

INFERRED = "ledger"  # the writer of events inferred here, not written by anyone
# The `code` of SkyPilot's RECOVERING row when the job's own code failed while its cluster
# stayed up (sky/jobs/state.py, USER_JOB_FAILURE_EVENT_CODE); any other row: the cluster was lost.
USER_JOB_FAILURE = "USER_JOB_FAILURE"


@dataclass(frozen=True)
class RunInfo:
    """Which of the journal's runs (one per `supervise start`) a view covers."""

    index: int  # 1-based
    count: int
    launched_at: float | None

    def as_json(self) -> dict[str, Any]:
        return {"index": self.index, "of": self.count, "launched_at": self.launched_at}

    def line(self) -> str | None:
        """A warning when there is more than one run; None otherwise."""
        if self.count <= 1:
            return None
        from datetime import datetime, timezone

        when = (datetime.fromtimestamp(self.launched_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
                if self.launched_at else "unknown")
        return (f"this ledger holds {self.count} runs under one name (started again after a stop or an end); "
                f"this covers the newest, run {self.index} of {self.count}, launched {when}")


def newest_run(events: list[Event]) -> tuple[list[Event], RunInfo]:
    """The events of the newest run: from its `launch` on (the journal's events only;
    the backend's record belongs to the job the registry names, which is the newest)."""
    ordered = sorted(events, key=lambda e: (e.t, e.writer, e.seq))
    launches = [e for e in ordered if e.kind == "launch"]
    if len(launches) <= 1:
        return ordered, RunInfo(1, 1, launches[0].t if launches else None)
    start = launches[-1]
    return [e for e in ordered if e.t >= start.t], RunInfo(len(launches), len(launches), start.t)


def lost_nodes(events: list[Event]) -> list[Event]:
    """`preempted` (without notice) for each node start that has no exit of its own, is
    followed by a later start of the job, and whose end nothing else explains (module
    docstring). Every recovery restarts every node, so the k-th start of each node
    belongs to the job's k-th start."""
    from datetime import datetime, timezone

    ordered = sorted(events, key=lambda e: (e.t, e.writer, e.seq))
    generations: dict[int, list[Event]] = {}
    count: dict[str, int] = {}
    for e in ordered:
        if e.kind == "node_start":
            generations.setdefault(count.get(e.writer, 0), []).append(e)
            count[e.writer] = count.get(e.writer, 0) + 1
    exits = {(e.writer, e.incarnation) for e in ordered if e.kind == "exit"}
    preempted = {e.incarnation for e in ordered if e.kind == "preempted"}
    cluster_lost = [e.t for e in ordered if e.kind == "recovery_started" and e.writer == SKYPILOT
                    and e.get("code") != USER_JOB_FAILURE]
    out = []
    for k, starts in sorted(generations.items()):
        if k + 1 not in generations:
            continue  # the newest start: still running, or ended by the job's own end
        lo, hi = min(s.t for s in starts), min(s.t for s in generations[k + 1])
        labels = {s.incarnation for s in starts}
        if labels & preempted:
            continue  # the emulator saw it and wrote it down
        exited = {(s.writer, s.incarnation) for s in starts} & exits
        if exited and not any(lo <= t <= hi for t in cluster_lost):
            continue  # a node's own exit ended this start; its peers were taken down after it
        seen = [e.t for e in ordered if lo <= e.t < hi and e.incarnation in labels and e.writer.startswith("node")]
        last = max(seen, default=lo)  # the loss came after the last sign of life of any node
        for s in starts:
            if (s.writer, s.incarnation) in exited:
                continue
            out.append(Event(kind="preempted", t=last, time=datetime.fromtimestamp(last, timezone.utc).isoformat(),
                             writer=INFERRED, incarnation=s.incarnation,
                             fields={"with_notice": False, "node_rank": s.get("node_rank"),
                                     "inferred": f"{s.writer} never reported its exit before the job started "
                                                 "again: lost without notice"}))
    return out


def merge(journal: list[Event], backend: list[Event] | None = None) -> list[Event]:
    """Journal + backend record + inferred node losses, in time order."""
    events = list(journal) + list(backend or [])
    return sorted(events + lost_nodes(events), key=lambda e: (e.t, e.writer, e.seq))


def run_events(ledger_url: str, *, backend_events: tuple[list, list[str]] | None = None,
               policy=None) -> tuple[list[Event], list[str], RunInfo]:
    """The one read of a run for every view: (events of the newest run, merged; problems;
    which run). Never raises on a bad or missing journal (see journal.read_events)."""
    from supervisor.ledger.journal import read_events

    journal, problems = read_events(ledger_url, policy)
    journal, run = newest_run(journal)
    if run.line():
        problems = [*problems, run.line()]
    backend, more = backend_events if backend_events is not None else ([], [])
    if not journal:
        return [], problems, run
    return merge(journal, backend), problems + list(more), run
