"""A SkyPilot managed job's own record and transitions, as ledger events.

SkyPilot knows what the node journal cannot: when the job was queued, when its
cluster was being provisioned, when the controller noticed a preemption, and
which resources it actually got. `supervise report NAME` for a SkyPilot job
merges these into the timeline. Two sources, both read through the API server:

- `sky.jobs.queue_v2(fields=FIELDS)`: one `ManagedJobRecord` (sky/schemas/api/
  responses.py) per task; epoch times submitted_at, start_at (cluster up, before
  setup), last_recovered_at, end_at; `resources` ("1x[H100:8][Spot]", from
  `backend_utils.get_task_resources_str`), the launched `accelerators`, cloud,
  region, recovery_count, failure_reason. queue_v2's default fields drop most of
  these, so they are named explicitly.
- POST `/jobs/events` (sky/jobs/server/server.py -> core.get_job_events ->
  state.get_job_events): one row per transition, newest first, {new_status,
  reason, code, timestamp}. Its body's default limit is 10 (payloads.
  GetJobEventsBody), so EVENTS_LIMIT is asked for. `timestamp` is written by
  state.add_job_event(_async) as `datetime.datetime.now()`: naive, in the
  controller's local time zone; controller_offset() finds that zone from the
  record's epoch times.

Per incarnation (each launch of the job's cluster), SkyPilot 0.14.1 keeps only the
newest: the recovery strategy's `_launch` (sky/jobs/recovery_strategy.py) calls
state.set_job_infra(cloud, region, zone) after every successful launch, which
overwrites the job_info row (only its node-name lineage, common_utils.
merge_node_names_lineage, keeps older launches, as names); queue_v2's cluster_resources,
accelerators, cloud and region come from the live cluster handle
(jobs.utils._populate_job_record_from_handle) while it is up; `resources` is the
request, written by state.set_pending and set_starting_async, never on recovery; the
transition rows carry status, reason and code, no resources. So the `resources` event
describes the newest launch only. Each node records its own launch in `node_start`
instead: placement() reads SKYPILOT_CLUSTER_INFO, which SkyPilot sets on every node
of every launch from handle.launched_resources (cloud, region, zone: sky/backends/
cloud_vm_ray_backend.py, CloudVmRayBackend._skypilot_predefined_env_vars, which
_get_task_env_vars adds to the run command's environment).

Everything but fetch() is a plain function of those shapes.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from supervisor.contract.jobstate import is_terminal
from supervisor.ledger.events import Event

WRITER = "skypilot"
FIELDS = ("job_id", "task_id", "job_name", "status", "resources", "cluster_resources", "accelerators", "cloud",
          "region", "infra", "submitted_at", "start_at", "end_at", "last_recovered_at", "recovery_count",
          "failure_reason", "job_duration")
EVENTS_LIMIT = 10_000
CLUSTER_INFO_ENV = "SKYPILOT_CLUSTER_INFO"
_TZ_STEP_S = 900  # time zones are whole quarter hours
_MATCH_S = 5.0  # a row and a record time this close are the same transition
_RESOURCES = re.compile(r"^(?P<nodes>\d+)x\[(?P<acc>[^\]]*)\](?P<spot>\[[^\]]*\])?")


def _as_dict(record: Any) -> dict[str, Any]:
    """A ManagedJobRecord (pydantic) or its dict -> dict with status as its plain value."""
    data = dict(record.model_dump() if hasattr(record, "model_dump") else record)
    status = data.get("status")
    data["status"] = getattr(status, "value", status)
    return data


def _naive_epoch(stamp: Any) -> float | None:
    """A row's timestamp (ISO text as orjson sends it, or a datetime), read as if it were UTC."""
    if isinstance(stamp, str):
        try:
            stamp = datetime.fromisoformat(stamp)
        except ValueError:
            return None
    if not isinstance(stamp, datetime):
        return None
    if stamp.tzinfo is not None:  # Postgres-backed servers send aware times: already exact
        return stamp.timestamp()
    return stamp.replace(tzinfo=timezone.utc).timestamp()


def _rows(job_events: Iterable[Mapping[str, Any]]) -> list[tuple[float, str, dict[str, Any]]]:
    """(naive time, status, row) oldest first; rows without a readable time are dropped."""
    out = []
    for row in job_events:
        t = _naive_epoch(row.get("timestamp"))
        status = getattr(row.get("new_status"), "value", row.get("new_status"))
        if t is not None and status:
            out.append((t, str(status), dict(row)))
    return sorted(out, key=lambda r: r[0])


def _is_aware(job_events: Iterable[Mapping[str, Any]]) -> bool:
    for row in job_events:
        stamp = row.get("timestamp")
        if isinstance(stamp, datetime):
            return stamp.tzinfo is not None
        if isinstance(stamp, str):
            return bool(re.search(r"([+-]\d\d:\d\d|Z)$", stamp))
    return False


def controller_offset(record: Mapping[str, Any], job_events: list[Mapping[str, Any]]) -> float | None:
    """Seconds to add to a naive event time to get UTC epoch (None: no anchor to tell).

    The newest RUNNING row is written with last_recovered_at (state.set_started_async
    and set_recovered_async both set it), the terminal row with end_at; the newest
    rows survive a limit, so these pairs hold even when older rows are cut. Their
    differences are the controller's UTC offset plus a few ms, rounded here to the
    quarter hour."""
    if _is_aware(job_events):
        return 0.0
    rec, rows = _as_dict(record), _rows(job_events)
    running = [t for t, s, _ in rows if s == "RUNNING"]
    pairs = []
    if running and rec.get("last_recovered_at"):
        pairs.append(rec["last_recovered_at"] - running[-1])
    ends = [t for t, s, _ in rows if is_terminal(s)]
    if ends and rec.get("end_at"):
        pairs.append(rec["end_at"] - ends[-1])
    if not pairs:
        return None
    return round(statistics.median(pairs) / _TZ_STEP_S) * _TZ_STEP_S


def used_resources(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the job actually ran on: accelerators ({"H100": 8}, None = CPU, absent = unknown), spot, place.

    `accelerators` is filled from the cluster's launched resources while it is up;
    afterwards `resources` ("2x[H100:8][Spot]", written when the task started) is
    the record, and it names one accelerator only when one was chosen."""
    rec = _as_dict(record)
    out: dict[str, Any] = {"cloud": rec.get("cloud"), "region": rec.get("region"), "infra": rec.get("infra")}
    m = _RESOURCES.match(str(rec.get("resources") or ""))
    if m:
        out["num_nodes"] = int(m["nodes"])
        spot = (m["spot"] or "").strip("[]")
        out["spot"] = True if spot == "Spot" else (False if spot in ("", "On-demand") else None)
    elif str(rec.get("cluster_resources") or "").startswith("[spot]"):
        out["spot"] = True
    if rec.get("accelerators"):
        out["accelerators"] = {str(k): int(math.ceil(v)) for k, v in rec["accelerators"].items()}
    elif m:
        options = [a.strip() for a in m["acc"].split(",") if a.strip()]
        if len(options) == 1 and options[0].upper().startswith("CPU:"):
            out["accelerators"] = None
        elif len(options) == 1:
            name, _, count = options[0].partition(":")
            out["accelerators"] = {name: int(float(count or 1))}
    return {k: v for k, v in out.items() if v is not None or k == "accelerators"}


def placement(env: Mapping[str, str]) -> dict[str, str]:
    """Where this node's launch landed ({cloud, region, zone}) from SKYPILOT_CLUSTER_INFO; {} off SkyPilot."""
    try:
        info = json.loads(env.get(CLUSTER_INFO_ENV) or "{}")
    except ValueError:
        return {}
    if not isinstance(info, dict):
        return {}
    return {k: str(info[k]) for k in ("cloud", "region", "zone") if info.get(k) not in (None, "", "None")}


def _event(kind: str, t: float, seq: int, **fields: Any) -> Event:
    return Event(kind=kind, t=t, time=datetime.fromtimestamp(t, timezone.utc).isoformat(), writer=WRITER,
                 incarnation=WRITER, seq=seq, fields={k: v for k, v in fields.items() if v is not None})


def to_events(record: Any, job_events: list[Mapping[str, Any]]) -> tuple[list[Event], list[str]]:
    """SkyPilot's record + transition rows -> ledger events (and what could not be placed).

    PENDING -> `backend_queued`; the first STARTING -> `provisioning_started`;
    RUNNING (cluster up, setup next) -> `provisioned`; RECOVERING -> `recovery_started`
    (SkyPilot noticed the loss: the end of detection) with its reason and code; a
    terminal status -> `job_finished`; the record itself -> `resources`."""
    rec, problems = _as_dict(record), []
    offset = controller_offset(rec, job_events)
    if offset is None and job_events:
        local = datetime.now().astimezone().utcoffset()
        offset = -local.total_seconds() if local is not None else 0.0
        problems.append("SkyPilot's event times could not be matched to its record; read them in this "
                        "machine's time zone")
    rows = _rows(job_events)
    out: list[Event] = []
    seq = 0
    seen_starting = False
    for t_naive, status, row in rows:
        t = t_naive + (offset or 0.0)
        seq += 1
        fields = {"status": status, "reason": row.get("reason") or None, "code": row.get("code") or None}
        if status == "PENDING":
            out.append(_event("backend_queued", t, seq, **fields))
        elif status == "STARTING" and not seen_starting:
            seen_starting = True
            out.append(_event("provisioning_started", t, seq, **fields))
        elif status == "RUNNING":
            out.append(_event("provisioned", t, seq, **fields))
        elif status == "RECOVERING":
            out.append(_event("recovery_started", t, seq, source=WRITER, **fields))
        elif is_terminal(status):
            out.append(_event("job_finished", t, seq, state=status,
                              reason=rec.get("failure_reason") or row.get("reason") or None))
    # Rows cut by the limit (or never written): the record's own epoch times stand in.
    def missing(kind: str, t: float) -> bool:
        return not any(e.kind == kind and abs(e.t - t) < _MATCH_S for e in out)

    for key in ("start_at", "last_recovered_at"):
        if rec.get(key) and missing("provisioned", float(rec[key])):
            out.append(_event("provisioned", float(rec[key]), seq + 1, status="RUNNING"))
    if rec.get("end_at") and is_terminal(rec.get("status")) and missing("job_finished", float(rec["end_at"])):
        out.append(_event("job_finished", float(rec["end_at"]), seq + 2, state=rec["status"],
                          reason=rec.get("failure_reason")))
    seen = sum(e.kind == "recovery_started" for e in out)
    if int(rec.get("recovery_count") or 0) > seen:
        problems.append(f"SkyPilot counts {rec['recovery_count']} recoveries but {seen} RECOVERING row(s) came back: "
                        "when it noticed the others is unknown")
    anchor = rec.get("start_at") or rec.get("submitted_at")
    if anchor:
        out.append(_event("resources", float(anchor), 0, source=WRITER, recovery_count=rec.get("recovery_count"),
                          failure_reason=rec.get("failure_reason"), **used_resources(rec)))
    if len(job_events) >= EVENTS_LIMIT:
        problems.append(f"SkyPilot returned {len(job_events)} transition rows (the limit asked for); older ones "
                        "are missing")
    return sorted(out, key=lambda e: (e.t, e.seq)), problems


def fetch(job_id: int) -> tuple[Any, list[dict[str, Any]]]:
    """The job's record and transition rows from the SkyPilot API server (the one network edge here)."""
    import sky
    from sky.server import common as server_common
    from sky.server.requests import payloads

    result = sky.stream_and_get(sky.jobs.queue_v2(refresh=False, job_ids=[int(job_id)], fields=list(FIELDS)))
    records = result[0] if isinstance(result, tuple) else result
    records = [r for r in records if int(_as_dict(r).get("job_id") or -1) == int(job_id)]
    if not records:
        raise LookupError(f"SkyPilot has no managed job {job_id}")
    body = payloads.GetJobEventsBody(job_id=int(job_id), limit=EVENTS_LIMIT)
    response = server_common.make_authenticated_request("POST", "/jobs/events", json=json.loads(body.model_dump_json()),
                                                       timeout=(5, None))
    rows = sky.get(server_common.get_request_id(response=response))
    return records[0], list(rows or [])


def job_events(job_id: int) -> tuple[list[Event], list[str]]:
    """fetch() + to_events(); SkyPilot trouble becomes a problem line, never an exception."""
    try:
        record, rows = fetch(job_id)
    except Exception as err:  # noqa: BLE001 - the report still works from the bucket's journal
        return [], [f"SkyPilot's record of job {job_id} is unavailable ({type(err).__name__}: {err}); "
                    "queue, provisioning and detection come from the journal alone"]
    return to_events(record, rows)
