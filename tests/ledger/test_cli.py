"""`supervise report` end to end on a written journal: table, JSON, PNG, bad input, no journal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import registry
from supervisor.ledger.prices import TABLE, price_for
from tests.ledger.runs import chaos_run


def _write_journal(ckpt: Path) -> dict:
    events, expect = chaos_run()
    by_inc: dict[str, list[str]] = {}
    for e in events:
        by_inc.setdefault(e.incarnation, []).append(e.to_line())
    for inc, lines in by_inc.items():
        path = ckpt / "_ledger" / inc / "w.abc.00000.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    return expect


def _supervise(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SUPERVISE_HOME": str(home), "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-c", "from supervisor.cli import main; main()", "report", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_report_json_table_and_plot_by_name(tmp_path):
    ckpt = tmp_path / "run"
    expect = _write_journal(ckpt)
    home = tmp_path / "home"
    os.environ["SUPERVISE_HOME"] = str(home)
    try:
        registry.record("demo-job", backend="local", checkpoints_url=str(ckpt))
    finally:
        del os.environ["SUPERVISE_HOME"]
    png = tmp_path / "out" / "timeline.png"
    res = _supervise("demo-job", "--json", "--plot", str(png), home=home)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    parts = ("productive_s", "checkpoint_s", "lost_s", "recovery_s", "queue_s")
    assert sum(r[k] for k in parts) == pytest.approx(r["wall_s"], abs=1e-6)
    assert r["wall_s"] == pytest.approx(expect["wall_s"], abs=1e-6)
    assert r["preemptions"] == {"notice": 1, "no_notice": 1}
    assert 0 < r["goodput"] < 1
    assert r["cost"]["spot_usd"] < r["cost"]["on_demand_usd"] and r["cost"]["price_source"]
    assert r["advice"]["interval_s"] > 0 and r["plot"] == str(png)
    assert r["ledger"] == f"{ckpt}/_ledger"

    from PIL import Image

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
        assert im.size[0] >= 800 and im.size[1] >= 400

    table = _supervise(str(ckpt), home=home)
    assert table.returncode == 0, table.stderr
    for text in ("goodput", "productive training", "lost work", "preemptions", "1 with notice, 1 without", "advice"):
        assert text in table.stdout


def test_corrupt_line_gives_a_partial_report(tmp_path):
    ckpt = tmp_path / "run"
    _write_journal(ckpt)
    victim = ckpt / "_ledger" / "i2" / "w.abc.00000.jsonl"
    victim.write_text(victim.read_text() + '{"kind": "progress", "t": 17000\n')
    res = _supervise(str(ckpt) + "/_ledger", "--json", home=tmp_path)
    assert res.returncode == 0 and "Traceback" not in res.stderr
    r = json.loads(res.stdout)
    assert r["preemptions"] == {"notice": 1, "no_notice": 1}
    assert len(r["problems"]) == 1 and "i2/w.abc.00000.jsonl:" in r["problems"][0]
    assert "skipped corrupt event" in res.stderr


def test_no_journal_and_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    res = _supervise(str(tmp_path / "empty"), home=tmp_path)
    assert res.returncode == 1 and "nothing to report" in res.stderr and "Traceback" not in res.stderr
    res = _supervise(str(tmp_path / "empty"), "--json", home=tmp_path)
    assert res.returncode == 1 and json.loads(res.stdout)["events"] == 0
    res = _supervise("no-such-job", home=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error: no job named") and "Traceback" not in res.stderr
    res = _supervise(str(tmp_path / "empty"), "--prices", str(tmp_path / "missing.yaml"), home=tmp_path)
    assert res.returncode == 2 and "price file" in res.stderr


def test_prices_sources(tmp_path):
    p = price_for("H100:8")
    assert (p.spot, p.on_demand) == pytest.approx((8 * TABLE["H100"][0], 8 * TABLE["H100"][1]))
    assert "built-in table" in p.source or "SkyPilot catalog" in p.source
    assert price_for(None).source.startswith("built-in table")
    f = tmp_path / "prices.yaml"
    f.write_text("H100:8: {spot: 20, on_demand: 50}\nCPU: {spot: 0.1, on_demand: 0.3}\n")
    assert (price_for("H100:8", price_file=f).spot, price_for("H100:8", price_file=f).on_demand) == (20, 50)
    assert price_for("H100:8", price_file=f).source == f"price file {f}"
    mixed = price_for("CPU", price_file=f, spot=0.05)
    assert (mixed.spot, mixed.on_demand) == (0.05, 0.3) and mixed.source.startswith("command line + price file")
    assert "no price for TPU" in price_for("TPU:4").source
