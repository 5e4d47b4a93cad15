"""Chaos for the local backend: what to break, when, and how.

Planning is pure (a seed and a few numbers in, a list of `ChaosEvent` out) so
the same seed always gives the same plan and tests need no processes. The
actions at the bottom do the breaking; the local controller calls them when
the training step it reads from the heartbeats reaches an event's step.

Kinds:
    notice   preempt a node with notice (SIGTERM to its node wrapper, which
             tells the trainer to save at the next step and exit 75)
    kill     preempt a node without notice (SIGKILL its whole process tree at
             once, torchrun workers in their own sessions included)
    stall    SIGSTOP one worker of a node (the wrapper's hang watchdog must notice)
    corrupt  truncate a shard of the newest committed checkpoint; runs while the
             nodes are down between two incarnations, so the next start must
             quarantine it and fall back (a corruption nobody reads is no test)
    outage   freeze the object store (SIGSTOP) for `duration_s` while a save is
             landing; fired by whoever owns the store (`supervise drill` for its
             embedded one), never by the local controller
"""

from __future__ import annotations

import random
import signal
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import threading

KINDS = ("notice", "kill", "stall", "corrupt", "outage")
LIVE_KINDS = ("notice", "kill", "stall")  # fired by the local controller while the nodes run
STORE_KINDS = ("outage",)  # fired by the store's owner, not by the controller


@dataclass(frozen=True)
class ChaosEvent:
    kind: str
    at_step: int  # fires once the job's training step reaches this
    node: int = 0
    deadline_s: float | None = None  # notice only: seconds the "cloud" grants
    # live kinds only: wait for step `at_step`'s save to be in flight (its objects
    # in the bucket, no commit marker yet) instead of firing once the step is reached
    during_save: bool = False
    duration_s: float | None = None  # outage only: how long the store stays frozen

    def describe(self) -> str:
        what = {
            "notice": "preempt with notice",
            "kill": "preempt without notice (SIGKILL)",
            "stall": "stall a rank (SIGSTOP)",
            "corrupt": "corrupt newest checkpoint",
            "outage": f"freeze the store for {self.duration_s or 0:g} s",
        }[self.kind]
        where = "" if self.kind in ("corrupt", *STORE_KINDS) else f" node {self.node}"
        when = f"during the save of step {self.at_step}" if self.during_save else f"at step {self.at_step}"
        return f"{what}{where} {when}"

    def to_dict(self) -> dict:
        return asdict(self)


def demo_plan(*, steps: int, interval: int, num_nodes: int, seed: int, deadline_s: float = 60.0) -> list[ChaosEvent]:
    """One preemption with notice (a `deadline_s` notice, like a cloud's), then one
    without notice whose restart finds the newest checkpoint corrupt. The seed
    picks the steps and the nodes.

    The notice comes after the first periodic checkpoint, and at least one more
    periodic commit lies between it and the kill, so the corrupted newest
    checkpoint has an older committed one to fall back to; the kill lands
    mid-interval when it can, so some work is genuinely lost and recomputed.
    """
    if interval < 1:
        raise ValueError(f"interval must be >= 1 (got {interval})")
    rng = random.Random(seed)
    notice_step = rng.randint(interval + 1, max(interval + 1, steps // 2))
    next_commit = (notice_step // interval + 1) * interval
    if next_commit + 1 > steps - 1:
        raise ValueError(f"{steps} steps with a checkpoint every {interval} leave no room for the demo's chaos plan; "
                         f"use at least {min_demo_steps(interval)} steps")
    candidates = list(range(next_commit + 1, steps))
    mid = [s for s in candidates if s % interval] or candidates
    kill_step = rng.choice(mid)
    nodes = list(range(num_nodes))
    return [
        ChaosEvent("notice", notice_step, rng.choice(nodes), deadline_s),
        ChaosEvent("kill", kill_step, rng.choice(nodes)),
        ChaosEvent("corrupt", kill_step),
    ]


def min_demo_steps(interval: int) -> int:
    """The fewest steps for which `demo_plan` always fits (worst-case seed)."""
    steps = interval + 3
    while True:
        worst_notice = max(interval + 1, steps // 2)
        if (worst_notice // interval + 1) * interval + 1 <= steps - 1:
            return steps
        steps += 1


def due(plan: list[ChaosEvent], fired: set[int], step: int | None, *, live: bool,
        saving: frozenset[int] | set[int] = frozenset()) -> list[int]:
    """Indices of plan events that are due and have not fired, in plan order; `live`
    picks the kinds fired while nodes run, else `corrupt`. An event is due once the
    job's step reaches its step, or, `during_save`, once that step's save is in
    flight (`saving`: steps whose save has objects in the bucket and no commit yet)."""
    if step is None:
        return []
    return [i for i, ev in enumerate(plan)
            if i not in fired and ev.kind not in STORE_KINDS and (ev.kind in LIVE_KINDS) == live
            and (ev.at_step in saving if ev.during_save else step >= ev.at_step)]


def watched_saves(plan: list[ChaosEvent], fired: set[int], step: int | None) -> list[int]:
    """Steps whose save a pending `during_save` event waits for, once training is one
    step short of them (the save of step N runs before step N's heartbeat)."""
    if step is None:
        return []
    return sorted({ev.at_step for i, ev in enumerate(plan)
                   if i not in fired and ev.during_save and ev.kind not in STORE_KINDS and step >= ev.at_step - 1})


def save_in_progress(store, step: int) -> bool:
    """Step `step`'s save has put objects in the bucket and its commit marker is not
    there yet: read through the store API (a listing of one folder). `store`: one
    `supervisor.store.fs.Store` kept by the poller (a new S3 client per poll costs
    more than the window it looks for)."""
    from supervisor.errors import SuperviseError
    from supervisor.contract.layout import COMMIT, step_dir

    try:
        names = store.listdir(step_dir(step))
    except SuperviseError:  # a drill's trigger must not take the job down; try again next poll
        return False
    return bool(names) and COMMIT not in names


# ---- actions -----------------------------------------------------------------


def preempt_with_notice(wrapper_pid: int, notice_file, deadline_s: float | None) -> str:
    """A cloud's notice with a deadline goes through the node's notice file (like a
    metadata server); without one it is what SkyPilot/torchrun send before a VM
    goes: SIGTERM to the node wrapper only (not its group, so the workers live to
    save)."""
    import os

    if deadline_s is not None:
        from supervisor.contract.runtime import write_json_atomic

        write_json_atomic(notice_file, {"deadline_s": deadline_s})
        return f"notice file with a {deadline_s:g} s deadline"
    os.kill(wrapper_pid, signal.SIGTERM)
    return "SIGTERM to the node wrapper"


def preempt_without_notice(node_tag: str) -> int:
    """The VM vanishes: SIGKILL every process of the node at once."""
    from supervisor.launch.procs import kill_tagged

    return kill_tagged(node_tag)


def stall_rank(node_tag: str) -> int | None:
    """SIGSTOP the first trainer worker (a process with a RANK variable) of the node."""
    from supervisor.launch.procs import tagged

    workers = []
    for proc in tagged(node_tag):
        try:
            env = proc.environ()
        except Exception:
            continue
        if "RANK" in env and "LOCAL_RANK" in env:
            workers.append((int(env["RANK"]), proc))
    if not workers:
        return None
    rank, proc = min(workers, key=lambda rp: rp[0])
    proc.send_signal(signal.SIGSTOP)
    return rank


def freeze_store(pid: int, seconds: float, until: threading.Event) -> str:
    """The store stops answering (SIGSTOP: connections stay open, requests hang, as
    in a partition), then comes back (SIGCONT) after `seconds` or once `until` is set."""
    import os
    import time

    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        until.wait(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)
    return f"store frozen (SIGSTOP) for {time.monotonic() - t0:.0f} s"


def corrupt_newest(checkpoints_url: str) -> str:
    """Truncate the first shard of the newest committed checkpoint to half its size."""
    from supervisor.store.catalog import Catalog
    from supervisor.contract.layout import step_dir

    catalog = Catalog(checkpoints_url)
    latest = catalog.latest()
    if latest.step is None:
        return "no committed checkpoint to corrupt"
    folder = step_dir(latest.step)
    name = min((n for n in catalog.store.listdir(folder) if n.endswith(".distcp")), default=None)
    if name is None:
        return f"step {latest.step} has no shard to corrupt"
    data = catalog.store.cat(folder, name)
    catalog.store.put(data[: len(data) // 2], folder, name)
    return f"truncated {name} of step {latest.step} from {len(data)} to {len(data) // 2} bytes"
