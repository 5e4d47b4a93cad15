"""Each start of a job (the first, then each recovery) priced by the resources of its own launch."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
from rich.console import Console
from sky import clouds
from sky.backends.cloud_vm_ray_backend import CloudVmRayBackend
from sky.catalog import common as catalog

from supervisor.ledger.prices import Price, price_for
from supervisor.ledger.report import render
from supervisor.ledger.skypilot import placement
from supervisor.ledger.timeline import summarize
from tests.ledger.runs import chaos_run, ev

REGION_PRICE = {"us-east-1": Price(10.0, 30.0, "east"), "us-west-2": Price(20.0, 40.0, "west")}


def _env_of(cloud, region: str | None, zone: str | None) -> dict[str, str]:
    """SKYPILOT_CLUSTER_INFO as SkyPilot's own backend builds it for a node; the handle stands in for a
    launched cluster (its launched_resources' cloud, region, zone are all the method reads)."""
    handle = SimpleNamespace(cluster_name="job-7", launched_resources=SimpleNamespace(cloud=cloud, region=region,
                                                                                     zone=zone))
    return CloudVmRayBackend._skypilot_predefined_env_vars(None, handle)


def test_placement_reads_what_skypilot_sets_on_each_node():
    assert placement(_env_of(clouds.AWS(), "us-east-1", "us-east-1a")) == {
        "cloud": "AWS", "region": "us-east-1", "zone": "us-east-1a"}
    assert placement(_env_of(clouds.Slurm(), "localslurm", None)) == {"cloud": "Slurm", "region": "localslurm"}
    assert placement({}) == {} and placement({"SKYPILOT_CLUSTER_INFO": "not json"}) == {}


def test_node_start_records_where_its_launch_landed(monkeypatch):
    from supervisor.node.wrapper import start_events
    from tests.node.test_wrapper_logic import _plan

    monkeypatch.setenv("SKYPILOT_CLUSTER_INFO", _env_of(clouds.AWS(), "us-west-2", None)["SKYPILOT_CLUSTER_INFO"])
    node_start = dict(start_events(_plan(), [], pid=1, overhead_s=0.0, host="h1"))["node_start"]
    assert (node_start["cloud"], node_start["region"], "zone" in node_start) == ("AWS", "us-west-2", False)


def _placed(events, where: dict[str, str]):
    """chaos_run with each start's node_start carrying its launch's placement (incarnation -> region)."""
    return [replace(e, fields={**e.fields, "cloud": "AWS", "region": where[e.incarnation]})
            if e.kind == "node_start" and e.incarnation in where else e for e in events]


def test_each_start_is_priced_by_its_own_region():
    base, _ = chaos_run()
    events = _placed(base, {"i0": "us-east-1", "i1": "us-west-2", "i2": "us-east-1"})
    r = summarize(events, price_of=lambda res: REGION_PRICE[res["region"]])
    one = summarize(base, price=Price(10.0, 30.0, "east"))
    starts = r["incarnations"]
    assert [(s["start"], s["region"], s["resources_from"]) for s in starts] == [
        (0, "us-east-1", "node"), (1, "us-west-2", "node"), (2, "us-east-1", "node")]
    # the starts split the run's held node-hours exactly; each is charged at its own price
    assert sum(s["node_hours"] for s in starts) == pytest.approx(one["cost"]["node_hours"])
    for s in starts:
        price = REGION_PRICE[s["region"]]
        assert s["cost"]["spot_usd"] == pytest.approx(s["node_hours"] * price.spot)
        assert s["cost"]["on_demand_usd"] == pytest.approx(s["node_hours"] * price.on_demand)
    c = r["cost"]
    assert c["spot_usd"] == pytest.approx(sum(s["cost"]["spot_usd"] for s in starts))
    assert c["badput_spot_usd"] == pytest.approx(sum(s["cost"]["badput_spot_usd"] for s in starts))
    assert c["spot_usd"] > one["cost"]["spot_usd"]  # the west start cost more
    assert c["price_source"] == "per start: east; west"
    # the first start holds machines from its node_start until the kill is detected (2 nodes)
    first_held = (25.9 + 2 - 10) * 2 / 3600
    assert starts[0]["node_hours"] == pytest.approx(first_held)
    assert set(one) <= set(r) and set(one["cost"]) == set(c)  # --json keeps its keys


def test_starts_without_a_record_of_their_launch_fall_back_to_the_run_and_say_so():
    base, _ = chaos_run()
    record = ev(0.5, "resources", "skypilot", "skypilot", accelerators={"H100": 8}, spot=True, cloud="AWS",
                region="us-west-2", num_nodes=2)
    r = summarize(base + [record], price_of=lambda res: REGION_PRICE[res["region"]])
    # SkyPilot's record is its newest launch: the last start's; the others are priced as the run
    assert [s["resources_from"] for s in r["incarnations"]] == ["run", "run", "skypilot"]
    assert all(s["region"] == "us-west-2" for s in r["incarnations"])
    console = Console(width=80, record=True)
    console.print(render(r))
    text = " ".join(console.export_text().split())
    assert "#0, #1 priced with the run's resources" in text


def test_unknown_resources_are_not_priced():
    base, _ = chaos_run()
    no_launch = [e for e in base if e.kind != "launch"]
    r = summarize(no_launch, price_of=lambda res: None)
    assert r["cost"] is None and r["incarnations"][0]["cost"] is None


def test_catalog_price_of_the_launch_region(tmp_path, monkeypatch):
    """A cached SkyPilot catalog (its columns as sky/catalog/data_fetchers write vms.csv); the
    directory stands in for ~/.sky/catalogs, which this machine never downloads."""
    monkeypatch.setattr(catalog, "_ABSOLUTE_VERSIONED_CATALOG_DIR", str(tmp_path))
    (tmp_path / "aws").mkdir()
    (tmp_path / "aws" / "vms.csv").write_text(
        "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,SpotPrice,Region,AvailabilityZone\n"
        "p5.48xlarge,H100,8,192,2048,98.32,30.0,us-east-1,us-east-1a\n"
        "p5.48xlarge,H100,8,192,2048,98.32,25.0,us-west-2,us-west-2a\n")
    east = price_for({"H100": 8}, cloud="aws", region="us-east-1")
    assert (east.spot, east.source) == (30.0, "SkyPilot catalog (cached aws/vms.csv, us-east-1)")
    anywhere = price_for({"H100": 8}, cloud="aws")
    assert (anywhere.spot, anywhere.source) == (25.0, "SkyPilot catalog (cached aws/vms.csv, cheapest region)")
    assert price_for({"H100": 8}, cloud="aws", region="eu-north-1").spot == 25.0
