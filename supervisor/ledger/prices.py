"""Hourly node prices for the cost part of the report, and where each came from.

Order of sources (the report names the one used):
1. the user's numbers: a YAML/JSON file (`--prices FILE`) or `--spot-price` / `--on-demand-price`;
2. SkyPilot's catalog, only if its CSV is already cached on this machine
   (`~/.sky/catalogs/<schema>/<cloud>/vms.csv`): reading it never triggers a download;
   the cheapest row in the launch's region when it is known, else in any region;
3. the built-in table below.

Price file format (keys are an accelerator with or without a count; "NAME" is per
device and is multiplied by the count, "NAME:N" is per node):

    H100:8: {spot: 24.0, on_demand: 55.04}
    A100: {spot: 1.2, on_demand: 2.75}
    CPU: {spot: 0.15, on_demand: 0.38}
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from supervisor.errors import SuperviseError

# Clouds whose SkyPilot catalog lists accelerator prices (`<cloud>/vms.csv`).
PRICED_CLOUDS = ("aws", "gcp", "azure", "lambda", "nebius", "runpod")
# USD per device-hour (GPU) or per node-hour (CPU). Approximate AWS us-east-1 list
# prices of 2025 (p5/p5en/p4d/p4de/g6/m6i); spot is a typical, not a quoted, price.
TABLE: dict[str, tuple[float, float]] = {  # name: (spot, on_demand)
    "H200": (3.90, 7.91),
    "H100": (3.00, 6.88),
    "A100-80GB": (1.55, 3.43),
    "A100": (1.20, 2.75),
    "L40S": (0.75, 1.86),
    "L4": (0.35, 0.80),
    "A10G": (0.40, 1.01),
    "CPU": (0.15, 0.384),  # one 8-vCPU node (m6i.2xlarge)
}


@dataclass(frozen=True)
class Price:
    spot: float  # USD per node-hour
    on_demand: float
    source: str


def parse_accelerators(text: str | None) -> tuple[str, int]:
    """'H100:8' -> ('H100', 8); None/'' -> ('CPU', 1)."""
    if not text:
        return "CPU", 1
    name, _, count = str(text).partition(":")
    try:
        return name.strip(), int(count) if count else 1
    except ValueError:
        raise SuperviseError(f"bad accelerator spec {text!r}: use NAME or NAME:COUNT, e.g. H100:8") from None


def accelerator_options(accelerators: Mapping[str, int] | str | None) -> list[tuple[str, int]]:
    """Any-of accelerators ({"H100": 8, "H200": 8}, "H100:8" or None = CPU) -> [(name, count)]."""
    if not accelerators:
        return [("CPU", 1)]
    if isinstance(accelerators, str):
        return [parse_accelerators(accelerators)]
    return [(str(name), int(count)) for name, count in accelerators.items()]


def load_price_file(path: str | Path) -> dict[str, tuple[float, float]]:
    """A user's price file -> {key: (spot, on_demand)}; SuperviseError says what to fix."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise SuperviseError(f"cannot read price file {path}: {err}") from None
    if not isinstance(data, dict):
        raise SuperviseError(f"price file {path}: expected a mapping like `H100:8: {{spot: 24, on_demand: 55}}`")
    table: dict[str, tuple[float, float]] = {}
    for key, value in data.items():
        if not isinstance(value, dict) or not all(isinstance(value.get(k), (int, float)) for k in ("spot", "on_demand")):
            raise SuperviseError(f"price file {path}: entry {key!r} needs numeric `spot` and `on_demand`")
        table[str(key).upper()] = (float(value["spot"]), float(value["on_demand"]))
    return table


def _lookup(table: dict[str, tuple[float, float]], name: str, count: int) -> tuple[float, float] | None:
    table = {k.upper(): v for k, v in table.items()}
    if f"{name}:{count}".upper() in table:
        return table[f"{name}:{count}".upper()]
    if name.upper() in table:
        spot, on_demand = table[name.upper()]
        return spot * count, on_demand * count
    return None


def _sky_catalog(name: str, count: int, cloud: str | None, region: str | None = None) -> Price | None:
    """Cheapest matching instance in an already-cached SkyPilot catalog (in `region` if it
    lists it); never downloads."""
    if name.upper() == "CPU":
        return None
    try:
        from sky.catalog import common
    except Exception:
        return None
    for c in ([cloud.lower()] if cloud else PRICED_CLOUDS):
        if c not in PRICED_CLOUDS:
            continue
        path = common.get_catalog_path(f"{c}/vms.csv")
        if not os.path.exists(path):
            continue
        best: dict[bool, tuple[float, float]] = {}  # in the region?: (spot, on_demand)
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    if (row.get("AcceleratorName", "").upper() != name.upper()
                            or int(float(row.get("AcceleratorCount") or 0)) != count):
                        continue
                    here = bool(region) and row.get("Region") == region
                    on_demand = float(row["Price"])
                    spot = float(row["SpotPrice"]) if row.get("SpotPrice") else on_demand
                except (ValueError, KeyError):
                    continue
                if here not in best or spot < best[here][0]:
                    best[here] = (spot, on_demand)
        if best:
            found = best.get(True) or best[False]
            where = region if True in best else "cheapest region"
            return Price(found[0], found[1], f"SkyPilot catalog (cached {c}/vms.csv, {where})")
    return None


def _one_price(name: str, count: int, cloud: str | None, region: str | None,
               price_file: str | Path | None) -> Price | None:
    """One accelerator option through the source order of the module docstring; None if unpriced."""
    if price_file is not None:
        found = _lookup(load_price_file(price_file), name, count)
        if found:
            return Price(found[0], found[1], f"price file {price_file}")
    from_sky = _sky_catalog(name, count, cloud, region)
    if from_sky:
        return from_sky
    found = _lookup(TABLE, name, count)
    if found:
        return Price(found[0], found[1], "built-in table (approximate AWS list prices, 2025)")
    return None


def price_for(accelerators: Mapping[str, int] | str | None, *, cloud: str | None = None, region: str | None = None,
              price_file: str | Path | None = None, spot: float | None = None, on_demand: float | None = None,
              prefer_spot: bool = True) -> Price:
    """The node-hour price of `accelerators` (any-of mapping, 'H100:8', None = CPU) and its source.

    With several options (SkyPilot picks one at launch), the cheapest one, by spot or
    on-demand price as `prefer_spot` says, is used and the source names it. This is the
    one price reader: the report, the `launch` event and `start`'s estimate all use it.
    """
    if spot is not None or on_demand is not None:
        base = price_for(accelerators, cloud=cloud, region=region, price_file=price_file, prefer_spot=prefer_spot)
        return Price(base.spot if spot is None else spot, base.on_demand if on_demand is None else on_demand,
                     "command line" + ("" if spot is not None and on_demand is not None else f" + {base.source}"))
    options = accelerator_options(accelerators)
    priced = [(p, f"{n}:{c}") for n, c in options if (p := _one_price(n, c, cloud, region, price_file))]
    if not priced:
        spot_cpu, od_cpu = TABLE["CPU"]
        names = "/".join(n for n, _ in options)
        return Price(spot_cpu, od_cpu, f"built-in table: no price for {names}, CPU node price used; pass --prices")
    best, label = min(priced, key=lambda pl: pl[0].spot if prefer_spot else pl[0].on_demand)
    if len(options) > 1:
        return Price(best.spot, best.on_demand, f"{best.source}; cheapest of the options, {label}")
    return best
