"""The setup event says how each node got its environment; the report shows it per start."""

from __future__ import annotations

from rich.console import Console

from supervisor.ledger import mark
from supervisor.ledger.journal import read_events
from supervisor.ledger.report import render, setup_runs
from supervisor.ledger.timeline import summarize
from tests.ledger.runs import ev, steps


def test_mark_records_how_and_rejects_an_unknown_word(tmp_path, capsys):
    import time

    import pytest

    ledger = str(tmp_path / "_ledger")
    assert mark.main(["setup", "--started-at", str(time.time() - 3), "--how", "restored", "--ledger", ledger]) == 0
    (event,) = read_events(ledger)[0]
    assert event.kind == "setup" and event.get("how") == "restored" and event.get("duration_s") >= 3
    with pytest.raises(SystemExit):
        mark.main(["setup", "--started-at", str(time.time()), "--how", "cached", "--ledger", ledger])
    assert "invalid choice: 'cached'" in capsys.readouterr().err


def test_the_report_labels_each_node_s_setup_per_start():
    events = [ev(0, "launch", backend="local", num_nodes=2),
              ev(60, "setup", "setup-0", "setup-node0", duration_s=58.0, code=0, node_rank=0, how="installed"),
              ev(61, "setup", "setup-0", "setup-node1", duration_s=59.0, code=0, node_rank=1, how="installed"),
              ev(62, "node_start")]
    body, t = steps("i0", 63, 1, 4)
    events += body + [ev(t + 0.1, "preempted", with_notice=False), ev(t + 1, "recovery_started", "c", "c"),
                      ev(t + 9, "setup", "setup-1", "setup-node0", duration_s=3.0, code=0, node_rank=0, how="reused"),
                      ev(t + 15, "setup", "setup-1", "setup-node1", duration_s=12.5, code=0, node_rank=1,
                         how="restored"),
                      ev(t + 16, "node_start", "i1")]
    body, t = steps("i1", t + 17, 5, 6)
    events += body + [ev(t + 0.1, "job_finished", state="SUCCEEDED")]
    report = summarize(events)
    report["setups"] = setup_runs(events, report["interruptions"])
    assert [(r["start"], r["node_rank"], r["how"]) for r in report["setups"]] == [
        (0, 0, "installed"), (0, 1, "installed"), (1, 0, "reused"), (1, 1, "restored")]
    console = Console(record=True, width=400)
    console.print(render(report))
    text = " ".join(console.export_text().split())
    assert "(node0 installed 58.00 s, node1 installed 59.00 s)" in text
    assert "(#1 node0 reused 3.00 s, #1 node1 restored 12.50 s)" in text


def test_mark_takes_the_node_rank_setup_has(tmp_path, monkeypatch):
    """SkyPilot gives setup SKYPILOT_SETUP_NODE_RANK (CloudVmRayBackend._setup), not SKYPILOT_NODE_RANK."""
    import time

    monkeypatch.delenv("SKYPILOT_NODE_RANK", raising=False)
    monkeypatch.setenv("SKYPILOT_SETUP_NODE_RANK", "3")
    ledger = str(tmp_path / "_ledger")
    assert mark.main(["setup", "--started-at", str(time.time()), "--how", "reused", "--ledger", ledger]) == 0
    (event,) = read_events(ledger)[0]
    assert event.get("node_rank") == 3 and event.writer == "setup-node3"


def test_mark_records_what_the_snapshot_publish_said(tmp_path):
    import time

    ledger = str(tmp_path / "_ledger")
    said = "supervise setup: warning: snapshot not published (tar of /v exited 1: file changed); trying again"
    assert mark.main(["setup", "--started-at", str(time.time()), "--how", "installed", "--snapshot", said,
                      "--ledger", ledger]) == 0
    assert mark.main(["setup", "--started-at", str(time.time()), "--how", "reused", "--snapshot", "",
                      "--ledger", ledger]) == 0  # setup passes an empty line where nothing was published
    events = read_events(ledger)[0]
    assert [e.get("snapshot") for e in events] == [said, None]
    assert [r.get("snapshot") for r in setup_runs(events, [])] == [said, None]
