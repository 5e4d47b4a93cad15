"""SkyPilot's record of a managed job -> ledger events -> report.

The records and rows are built by SkyPilot's own code: a `ManagedJobRecord`
passed through the server's queue_v2 encoder, return-value serializer and the
client's decoder, and `/jobs/events` rows shaped as `sky.jobs.state.get_job_events`
returns them (ManagedJobStatus, naive controller-local datetimes), serialized the
way the API server serializes them. They stand in for a live API server only.
"""

from __future__ import annotations

import datetime
from zoneinfo import ZoneInfo

import orjson
import pytest
from sky.jobs.state import ManagedJobStatus
from sky.schemas.api import responses
from sky.server import constants as server_constants
from sky.server.requests.request_names import RequestName
from sky.server.requests.serializers import decoders, encoders, return_value_serializers

from supervisor.ledger import skypilot
from supervisor.ledger.events import Event, launch_fields
from supervisor.ledger.prices import Price
from supervisor.ledger.timeline import summarize

T0 = 1_780_000_000.0
CONTROLLER_TZ = ZoneInfo("America/Los_Angeles")  # the controller's clock is not UTC


QUEUE_V2 = server_constants.REQUEST_NAME_PREFIX + RequestName.JOBS_QUEUE_V2.value
EVENTS = server_constants.REQUEST_NAME_PREFIX + RequestName.JOBS_EVENTS.value


def client_record(**fields) -> responses.ManagedJobRecord:
    """A queue_v2 record as the client receives it (server encoder -> JSON -> client decoder)."""
    job = responses.ManagedJobRecord(**fields)
    encoded = encoders.get_encoder(QUEUE_V2)(([job], 1, {}, 1))
    wire = return_value_serializers.get_serializer(QUEUE_V2)(encoded)
    jobs, *_ = decoders.get_decoder(QUEUE_V2)(orjson.loads(wire))
    return jobs[0]


def client_rows(*rows: tuple[float, ManagedJobStatus, str, str | None]) -> list[dict]:
    """/jobs/events rows, newest first, as state.get_job_events builds them and the client decodes them."""
    server = [{"spot_job_id": 7, "task_id": 0, "new_status": status, "code": code, "reason": reason,
               "timestamp": datetime.datetime.fromtimestamp(t, CONTROLLER_TZ).replace(tzinfo=None)}
              for t, status, reason, code in sorted(rows, key=lambda r: -r[0])]
    wire = return_value_serializers.get_serializer(EVENTS)(server)
    return decoders.get_decoder(EVENTS)(orjson.loads(wire))


def ev(t, kind, writer="node0", inc="i1", **fields):
    return Event(kind=kind, t=T0 + t, time="", writer=writer, incarnation=inc, fields=fields)


# One recovery after the Slurm allocation vanished (scancel, no notice): SkyPilot noticed
# at +300 s, the new cluster was up at +420 s (last_recovered_at).
ROWS = [(T0 + 0.5, ManagedJobStatus.PENDING, "Waiting for the jobs controller", None),
        (T0 + 1.0, ManagedJobStatus.STARTING, "Job is starting", None),
        (T0 + 60.0, ManagedJobStatus.RUNNING, "Job has started", None),
        (T0 + 300.0, ManagedJobStatus.RECOVERING, "Cluster preempted or failed, recovering", None),
        (T0 + 420.0, ManagedJobStatus.RUNNING, "Job has recovered", None),
        (T0 + 520.0, ManagedJobStatus.SUCCEEDED, "Job succeeded", None)]
RECORD = dict(job_id=7, task_id=0, job_name="llama", status=ManagedJobStatus.SUCCEEDED,
              resources="1x[H100:8][Spot]", cloud="Slurm", region="localslurm", submitted_at=T0 + 0.9,
              start_at=T0 + 60.0, last_recovered_at=T0 + 420.0, end_at=T0 + 520.0, recovery_count=1,
              failure_reason=None, job_duration=340.0)


def node_events() -> list[Event]:
    # the launch event is written after SkyPilot accepted the job (its PENDING row came first)
    e = [Event(kind="launch", t=T0 + 2.0, time="", writer="launcher", incarnation="launcher",
               fields=launch_fields(name="llama", backend="skypilot", num_nodes=1,
                                    accelerators={"H100": 8, "H200": 8}, spot=True, infra="slurm"))]
    e += [ev(90, "setup", "setup-node0", "setup-1", duration_s=28.0, code=0), ev(92, "node_start", num_nodes=1),
          ev(100, "trainer_ready"), ev(101, "checkpoint_loaded", step=0), ev(103, "first_step", step=1)]
    e += [ev(103 + 2 * s, "progress", step=1 + s) for s in range(1, 10)]  # step 10 at +121
    e += [ev(111, "checkpoint_saved", step=5, duration_s=1.0), ev(112, "checkpoint_committed", step=5, duration_s=1.0)]
    # the allocation vanished after step 10 and nobody wrote a word: the next events are SkyPilot's
    e += [ev(450, "setup", "setup-node0", "setup-2", duration_s=25.0, code=0),
          ev(452, "node_start", "node0", "i2", num_nodes=1), ev(460, "trainer_ready", "node0", "i2"),
          ev(462, "checkpoint_loaded", "node0", "i2", step=5), ev(470, "first_step", "node0", "i2", step=6)]
    e += [ev(470 + 2 * s, "progress", "node0", "i2", step=6 + s) for s in range(1, 15)]  # step 20 at +498
    return e


def test_controller_offset_from_the_record():
    rows = client_rows(*ROWS)
    offset = skypilot.controller_offset(client_record(**RECORD), rows)
    naive_running = skypilot._naive_epoch(rows[-3]["timestamp"])
    assert naive_running + offset == pytest.approx(T0 + 60.0)
    assert offset == -CONTROLLER_TZ.utcoffset(datetime.datetime.fromtimestamp(T0)).total_seconds()


def test_rows_become_events_at_skypilot_times():
    events, problems = skypilot.to_events(client_record(**RECORD), client_rows(*ROWS))
    assert problems == []
    times = {e.kind: e.t - T0 for e in events if e.kind != "provisioned"}
    assert times == {"backend_queued": pytest.approx(0.5), "provisioning_started": pytest.approx(1.0),
                     "recovery_started": pytest.approx(300.0), "job_finished": pytest.approx(520.0),
                     "resources": pytest.approx(60.0)}
    assert [e.t - T0 for e in events if e.kind == "provisioned"] == [pytest.approx(60.0), pytest.approx(420.0)]
    res = next(e for e in events if e.kind == "resources")
    assert res.fields["accelerators"] == {"H100": 8} and res.fields["spot"] is True and res.fields["cloud"] == "Slurm"
    assert next(e for e in events if e.kind == "job_finished").get("state") == "SUCCEEDED"


def test_used_resources_from_skypilot_strings():
    launched = client_record(job_id=1, status=ManagedJobStatus.RUNNING, resources="2x[A100:8, H100:8][Spot]", accelerators={"H100": 8},
                             cloud="AWS", region="us-east-1")
    assert skypilot.used_resources(launched) == {"cloud": "AWS", "region": "us-east-1", "num_nodes": 2,
                                                  "spot": True, "accelerators": {"H100": 8}}
    undecided = skypilot.used_resources(client_record(job_id=1, status=ManagedJobStatus.RUNNING, resources="1x[A100:8, H100:8][On-demand|Spot]"))
    assert "accelerators" not in undecided and "spot" not in undecided
    cpu = skypilot.used_resources(client_record(job_id=1, status=ManagedJobStatus.RUNNING, resources="1x[CPU:1+]"))
    assert cpu["accelerators"] is None and cpu["spot"] is False


def test_report_of_a_skypilot_job():
    sky_events, _ = skypilot.to_events(client_record(**RECORD), client_rows(*ROWS))
    r = summarize(sorted(node_events() + sky_events, key=lambda e: e.t), price=Price(24.0, 55.0, "test"))
    assert r["state"] == "SUCCEEDED" and r["recoveries"] == 1 and r["wall_s"] == pytest.approx(520.0 - 0.5)
    assert sum(r[k] for k in ("productive_s", "checkpoint_s", "lost_s", "recovery_s", "queue_s")) == \
        pytest.approx(r["wall_s"])
    assert sum(r["badput"].values()) + r["productive_s"] == pytest.approx(r["wall_s"])
    start = r["phases"]["start"]
    assert start["queue_s"] == pytest.approx(0.5)  # PENDING -> STARTING (the launch event came later)
    assert start["provisioning_s"] == pytest.approx(59.0)  # STARTING -> RUNNING (start_at)
    assert start["setup_s"] == pytest.approx(92 - 60 - 2)  # cluster up -> setup's end
    assert start["startup_s"] == pytest.approx(10.0) and start["checkpoint_load_s"] == pytest.approx(1.0)
    assert start["first_step_s"] == pytest.approx(2.0)
    ep = r["interruptions"][0]
    assert ep["cause"] == "failure" and ep["reason"] == "Cluster preempted or failed, recovering"
    # the loss is placed at the last sign of life (step 10, +121); SkyPilot noticed at +300
    assert ep["phases"]["detection_s"] == pytest.approx(300 - 121)
    assert ep["phases"]["provisioning_s"] == pytest.approx(120.0)  # RECOVERING -> last_recovered_at
    assert ep["phases"]["setup_s"] == pytest.approx(450 - 420) and ep["phases"]["startup_s"] == pytest.approx(10.0)
    assert ep["phases"]["checkpoint_load_s"] == pytest.approx(2.0) and ep["phases"]["first_step_s"] == 8.0
    assert ep["resumed_step"] == 5 and ep["lost_steps"] == 5 == r["steps"]["recomputed"]
    assert r["accelerators"] == "H100:8" and r["spot"] is True  # what SkyPilot's record says ran


def test_truncated_rows_fall_back_to_record_times():
    rows = client_rows(*ROWS[-2:])  # only the newest rows survived a small limit
    events, problems = skypilot.to_events(client_record(**RECORD), rows)
    assert [(e.kind, e.t - T0) for e in events if e.kind in ("provisioned", "job_finished")] == [
        ("provisioned", 60.0), ("provisioned", pytest.approx(420.0)), ("job_finished", pytest.approx(520.0))]
    assert "recovery_started" not in [e.kind for e in events]  # start_at stood in for the cut row
    assert problems and "1 recoveries but 0 RECOVERING" in problems[0]


def test_no_launch_event_means_cost_unknown(tmp_path):
    from supervisor.ledger.report import build_report
    from supervisor.ledger.journal import Journal

    j = Journal(str(tmp_path / "_ledger"), writer="node0", incarnation="i1")
    j.emit("node_start", num_nodes=1)
    j.emit("first_step", step=1)
    report = build_report(str(tmp_path / "_ledger"))
    assert report["cost"] is None
    assert build_report(str(tmp_path / "_ledger"), spot_price=1.0, on_demand_price=2.0)["cost"]["spot_usd"] >= 0


def test_report_target_chooses_the_backend_record(tmp_path, monkeypatch):
    from supervisor import registry
    from supervisor.ledger.report import backend_events_of

    monkeypatch.setenv("SUPERVISE_HOME", str(tmp_path))
    registry.record("local-run", backend="local", checkpoints_url=str(tmp_path / "ck"), job_id="local-1")
    registry.record("sky-run", backend="skypilot", checkpoints_url="s3://b/sky-run", job_id="")
    assert backend_events_of("local-run") is None and backend_events_of("s3://b/sky-run") is None
    events, problems = backend_events_of("sky-run")
    assert events == [] and "no SkyPilot job id recorded" in problems[0]
