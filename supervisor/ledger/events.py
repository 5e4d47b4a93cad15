"""What a ledger event is: its kinds, the fields each kind carries, and parsing.

One event is one JSON object on one line:

    {"kind": "progress", "time": "2025-01-01T00:00:00.123456+00:00", "t": 1735689600.123456,
     "mono": 1234.5, "writer": "node0-rank0", "incarnation": "i1", "seq": 7, "host": "...",
     "fields": {"step": 40, "loss": 3.2}}

`t` (UTC epoch seconds) orders events across writers; `mono` is the writer's
monotonic clock, comparable only within one writer; measured durations are
fields (`duration_s`). Unknown kinds are kept (newer writers, older readers);
known kinds whose fields have the wrong type are rejected as problems so that
the report never does arithmetic on garbage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

# kind -> {field: accepted types}; a field listed here may be absent or null unless in REQUIRED.
_NUM = (int, float)
KINDS: dict[str, dict[str, tuple[type, ...]]] = {
    # launcher: once per job, built by launch_fields(). accelerators: the any-of options asked for,
    # {"H100": 8, "H200": 8} (null = CPU); price_source: where the report's prices will come from.
    "launch": {"name": (str,), "backend": (str,), "num_nodes": (int,), "accelerators": (dict,), "spot": (bool,),
               "infra": (str,), "job_id": (str,), "price_source": (str,)},
    # the backend's own record (SkyPilot: imported by ledger.skypilot at report time)
    "backend_queued": {"reason": (str,)},  # the job waits in the backend's queue
    "provisioning_started": {"reason": (str,)},  # the backend begins to get machines
    "provisioned": {"reason": (str,)},  # machines are up; setup comes next
    "resources": {"accelerators": (dict,), "spot": (bool,), "num_nodes": (int,), "cloud": (str,),
                  "region": (str,), "source": (str,)},  # what the job actually ran on
    # setup script ran (emitted at its end); how: reused | restored (the bucket's snapshot) | installed
    "setup": {"duration_s": _NUM, "code": (int,), "node_rank": (int,), "how": (str,), "snapshot": (str,)},
    # node wrapper began on a machine; cloud/region/zone: where this launch landed (ledger.skypilot.placement)
    "node_start": {"node_rank": (int,), "num_nodes": (int,), "cloud": (str,), "region": (str,), "zone": (str,)},
    "trainer_start": {"world_size": (int,)},  # torchrun / trainer processes started
    # step to load (null = fresh start); with checkpoint.interval auto, the interval chosen and why
    "resume": {"step": (int,), "skipped": (list,), "checkpoint_interval": (int,), "interval_source": (str,),
               "interval_reason": (str,)},
    "trainer_ready": {},  # TorchTitan built the model; the checkpoint load starts
    "checkpoint_loaded": {"step": (int,)},  # the resumed state is in memory (step 0 = fresh start)
    "first_step": {"step": (int,)},  # first training step of this incarnation completed
    "progress": {"step": (int,), "loss": _NUM},  # a training step completed
    "checkpoint_saved": {"step": (int,), "duration_s": _NUM},  # save of step returned (emitted at its end)
    # an async save's upload finished (duration_s: from the save's start; the loop was blocked for checkpoint_saved's)
    "checkpoint_uploaded": {"step": (int,), "duration_s": _NUM},
    "checkpoint_committed": {"step": (int,), "duration_s": _NUM},  # verified + _COMMIT.json written
    "checkpoint_quarantined": {"step": (int,), "reason": (str,)},
    "notice": {"source": (str,), "deadline": _NUM},  # preemption notice received (deadline: epoch or null)
    # an early notice (AWS rebalance recommendation): the trainer saves at the next step and trains on
    "early_notice": {"source": (str,), "received_at": _NUM},
    "early_save": {"step": (int,), "save": (bool,), "reason": (str,)},  # the trainer's answer (save: False = had one)
    "preempted": {"with_notice": (bool,), "saved_step": (int,)},  # the node went away (after saving, if noticed)
    "exit": {"code": (int,), "reason": (str,), "step": (int,)},  # a node wrapper / trainer exited (step: last one done)
    "recovery_started": {"reason": (str,), "code": (str,)},  # the backend noticed the loss, brings the job back
    "recovery_finished": {},
    "chaos": {"action": (str,), "step": (int,)},  # a fault injected on purpose (step: the trainer's step then)
    "job_finished": {"state": (str,)},  # SUCCEEDED / FAILED / CANCELLED
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "first_step": ("step",),
    "progress": ("step",),
    "checkpoint_saved": ("step", "duration_s"),
    "checkpoint_uploaded": ("step", "duration_s"),
    "checkpoint_committed": ("step", "duration_s"),
    "setup": ("duration_s",),
    "preempted": ("with_notice",),
    "exit": ("code",),
}
# Events that end a stretch of training (the machine or the trainer is gone).
LOSS_KINDS = frozenset({"preempted", "exit"})
# Events that prove the trainer of an incarnation is still working.
ACTIVITY_KINDS = frozenset({"progress", "checkpoint_saved", "checkpoint_uploaded", "checkpoint_committed"})


@dataclass(frozen=True)
class Event:
    kind: str
    t: float  # UTC epoch seconds
    time: str  # the same instant, ISO 8601 UTC
    writer: str
    incarnation: str
    mono: float | None = None
    seq: int = 0
    host: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        value = self.fields.get(name)
        return default if value is None else value

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "time": self.time, "t": self.t, "mono": self.mono, "writer": self.writer,
                "incarnation": self.incarnation, "seq": self.seq, "host": self.host, "fields": self.fields}

    def to_line(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)


def check_fields(kind: str, fields: dict[str, Any]) -> list[str]:
    """What is wrong with the fields of a known kind (empty when fine or kind unknown)."""
    spec = KINDS.get(kind)
    if spec is None:
        return []
    problems = [f"{kind}: missing field {name!r}" for name in REQUIRED.get(kind, ()) if fields.get(name) is None]
    for name, types in spec.items():
        value = fields.get(name)
        if value is None:
            continue
        # bool is an int in Python; a flag must not pass as a step.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            problems.append(f"{kind}: field {name!r} should be {'/'.join(t.__name__ for t in types)}, got {value!r}")
    return problems


def parse_line(line: str) -> Event:
    """One journal line -> Event; ValueError says what is wrong."""
    try:
        raw = json.loads(line)
    except ValueError as err:
        raise ValueError(f"not JSON ({err.msg})") from None
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    kind, t = raw.get("kind"), raw.get("t")
    if not isinstance(kind, str) or not kind:
        raise ValueError("no kind")
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        raise ValueError(f"{kind}: no epoch time 't'")
    fields = raw.get("fields") or {}
    if not isinstance(fields, dict):
        raise ValueError(f"{kind}: fields is not an object")
    problems = check_fields(kind, fields)
    if problems:
        raise ValueError("; ".join(problems))
    mono = raw.get("mono")
    return Event(kind=kind, t=float(t), time=str(raw.get("time") or ""), writer=str(raw.get("writer") or "?"),
                 incarnation=str(raw.get("incarnation") or "?"),
                 mono=float(mono) if isinstance(mono, (int, float)) else None,
                 seq=int(raw.get("seq") or 0), host=raw.get("host"), fields=fields)


def launch_fields(*, name: str, backend: str, num_nodes: int, accelerators: Mapping[str, int] | None, spot: bool,
                  infra: str | None = None, job_id: str | None = None) -> dict[str, Any]:
    """The `launch` event's fields, one shape for every backend: `journal.emit("launch", **launch_fields(...))`.

    `accelerators` is the any-of mapping as the user gave it (None = CPU); the price
    source is resolved now so the report can say where its prices came from.
    """
    from supervisor.ledger.prices import price_for

    options = {str(k): int(v) for k, v in accelerators.items()} if accelerators else None
    cloud = infra.split("/")[0] if infra else None
    return {"name": name, "backend": backend, "num_nodes": int(num_nodes), "accelerators": options,
            "spot": bool(spot), "infra": infra, "job_id": None if job_id is None else str(job_id),
            "price_source": price_for(options, cloud=cloud, prefer_spot=spot).source}
