"""Demo goodput with chaos vs without, and where a recovery's time goes.

    python benchmarks/demo_goodput.py [--steps 24] [--seed 0] [--out benchmarks/results/demo_goodput.json]

One `supervise demo` run: the chaos job and its uninterrupted reference (the
same job with --no-chaos: same data, seed and 2-node topology) run one after
the other on this machine, so their reports compare side by side. Then each
injected preemption is taken apart, from the kill (or the notice) to the
first training step again:

    detection      chaos kill -> the first node exit recorded (for a notice:
                      notice_to_exit, which includes the save and commit)
    restart        -> the new node wrappers run (teardown of the other node,
                      new processes, Python start-up; minus the injected
                      corruption's own time, listed apart)
    catalog        wrapper start -> torchrun started (catalog lookup with
                      verification and fallback, argument checks)
    titan start-up torchrun started -> TorchTitan begins loading the checkpoint
    checkpoint load TorchTitan's own "Finished loading the checkpoint in X s"
    first step     load done -> first training step completed

Times come from the run ledger (UTC epoch), the controller's chaos records and
TorchTitan's log lines in the node logs (local time, millisecond resolution).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path

_TITAN_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
_LOADED = re.compile(r"Finished loading the checkpoint in ([0-9.]+) seconds")


def _log_time(line: str) -> float | None:
    m = _TITAN_TIME.search(line)
    if not m:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _incarnation_lines(log: Path, inc: str) -> list[str]:
    """Lines of one incarnation in a node log (the controller writes a header per start)."""
    out, inside = [], False
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("=== incarnation "):
            inside = line.startswith(f"=== incarnation {inc},")
            continue
        if inside:
            out.append(line)
    return out


def recovery_split(events: list, chaos: dict, job_dir: Path) -> dict:
    """Seconds from one chaos action to the first step of the next incarnation, by stage."""
    inc = str(chaos["incarnation"] + 1)
    t0 = chaos["time"]
    of = lambda kind, i=inc: [e for e in events if e.kind == kind and e.incarnation == i]  # noqa: E731
    seen = [e.t for e in events if e.writer == "controller" and e.kind == "recovery_started"
            and e.incarnation == str(chaos["incarnation"])]
    exits = [e.t for e in events if e.kind in ("exit", "preempted") and e.incarnation == str(chaos["incarnation"])]
    trainer = of("trainer_start")
    first = of("first_step")
    if not (seen and trainer and first):
        return {"error": "incomplete ledger for this recovery"}
    wrapper_start = min(e.t - float(e.get("wrapper_overhead_s") or 0.0) for e in trainer)
    torchrun_start = max(e.t for e in trainer)
    loads, load_s = [], []
    for log in sorted(job_dir.glob("node-*.log")):
        for line in _incarnation_lines(log, inc):
            if "Loading the checkpoint from" in line and _log_time(line):
                loads.append(_log_time(line))
            m = _LOADED.search(line)
            if m:
                load_s.append(float(m.group(1)))
    detected = min(exits) if exits else seen[0]
    corrupt_s = chaos.get("corrupt_s", 0.0)
    load_start = max(loads) if loads else None
    load = max(load_s) if load_s else 0.0
    split = {
        # after a notice the nodes first save and commit, then exit: not detection
        ("notice_to_exit_s" if chaos["kind"] == "notice" else "detection_s"): max(0.0, detected - t0),
        "restart_s": wrapper_start - detected - corrupt_s,
        "injected_corruption_s": corrupt_s,
        "catalog_s": torchrun_start - wrapper_start,
        "titan_startup_s": (load_start - torchrun_start) if load_start else None,
        "checkpoint_load_s": load,
        "first_step_s": (first[0].t - (load_start + load)) if load_start else first[0].t - torchrun_start,
        "total_s": first[0].t - t0,
    }
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in split.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interval", type=int, default=None)
    p.add_argument("--interval-auto", metavar="LOW:HIGH", default=None,
                   help="then run checkpoint.interval auto in LOW..HIGH on the same seed and chaos plan; print auto vs fixed")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_goodput.json"))
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from supervisor.demo import Demo, DemoConfig
    from supervisor.launch.local import job_dir, read_state
    from supervisor.ledger.report import build_report
    from supervisor.ledger.journal import read_events
    from supervisor.contract.runtime import ledger_url

    interval = a.interval or max(1, a.steps // 4)
    demo = Demo(DemoConfig(steps=a.steps, seed=a.seed, interval=interval, quiet=True, keep=True,
                           plot=a.out.with_suffix(".png")))
    t = time.monotonic()
    try:
        chaos_report = demo.run()
        ref_name = f"{demo.id}-ref"
        ref_report = build_report(ledger_url(demo.session.store.url(ref_name)))
        events, _ = read_events(chaos_report["ledger"])
        fired = (read_state(demo.id) or {}).get("chaos_fired", [])
        corrupt = {c["incarnation"]: c.get("duration_s", 0.0) for c in fired if c["kind"] == "corrupt"}
        recoveries = []
        for c in fired:
            if c["kind"] in ("notice", "kill"):
                c = {**c, "corrupt_s": corrupt.get(c["incarnation"], 0.0)}
                recoveries.append({"action": c["kind"], "observed_step": c["observed_step"],
                                   **recovery_split(events, c, job_dir(demo.id))})
    finally:
        demo.session.cleanup()

    keys = ("wall_s", "productive_s", "checkpoint_s", "lost_s", "recovery_s", "queue_s", "goodput")
    result = {
        "steps": a.steps, "interval": interval, "seed": a.seed, "bench_wall_s": round(time.monotonic() - t, 1),
        "chaos": {k: chaos_report.get(k) for k in (*keys, "preemptions", "weights_match", "breakdown", "steps")},
        "no_chaos": {k: ref_report.get(k) for k in (*keys, "breakdown", "steps")},
        "recoveries": recoveries,
        "chaos_plan": chaos_report.get("chaos_plan"),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1, default=str))

    print(f"{'':28}{'chaos':>10}{'no chaos':>10}")
    for k in keys:
        c, n = result["chaos"][k], result["no_chaos"][k]
        fmt = (lambda v: f"{v * 100:9.1f}%") if k == "goodput" else (lambda v: f"{v:9.1f}s")
        print(f"{k:28}{fmt(c):>10}{fmt(n):>10}")
    print(f"weights match: {result['chaos']['weights_match']}; preemptions {result['chaos']['preemptions']}")
    for r in recoveries:
        print(f"recovery after {r['action']} at step {r['observed_step']}: " +
              ", ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in r.items() if k.endswith("_s") and v is not None))
    if a.interval_auto:
        low, high = (int(x) for x in a.interval_auto.split(":"))
        result["auto_vs_fixed"] = auto_vs_fixed(a, interval, (low, high), result["chaos"])
        a.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {a.out}")
    return 0 if result["chaos"]["weights_match"] else 1


def auto_vs_fixed(a, interval: int, auto: tuple[int, int], fixed: dict) -> dict:
    """The same demo (seed, chaos plan built for `interval`) with checkpoint.interval auto; ratios to fixed."""
    from supervisor.demo import Demo, DemoConfig
    from supervisor.ledger.journal import read_events

    demo = Demo(DemoConfig(steps=a.steps, seed=a.seed, interval=interval, interval_auto=auto, quiet=True, keep=False))
    report = demo.run()
    events, _ = read_events(report["ledger"])
    chosen = [e.get("interval_reason") for e in events if e.kind == "resume" and e.get("interval_reason")]
    keys = ("goodput", "wall_s", "productive_s", "checkpoint_s", "lost_s", "recovery_s")
    out = {"range": list(auto), "fixed": {k: fixed.get(k) for k in keys}, "auto": {k: report.get(k) for k in keys},
           "auto_weights_match": report.get("weights_match"), "auto_intervals": sorted(set(chosen)),
           "ratio_auto_to_fixed": {k: (report[k] / fixed[k] if fixed.get(k) else None) for k in keys}}
    print(f"\ncheckpoint.interval auto {auto[0]}..{auto[1]} vs fixed {interval} (same seed {a.seed} and chaos plan):")
    for k in keys:
        ratio = out["ratio_auto_to_fixed"][k]
        print(f"  {k:14} fixed {fixed[k]:9.3f}  auto {report[k]:9.3f}  auto/fixed {ratio:.3f}" if ratio is not None
              else f"  {k:14} fixed {fixed[k]}  auto {report[k]}")
    for reason in out["auto_intervals"]:
        print(f"  chosen: {reason}")
    return out


if __name__ == "__main__":
    sys.exit(main())
