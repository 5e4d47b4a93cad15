"""The run as one picture: step counter over wall time on top of coloured phase bands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from supervisor.ledger.events import Event
from supervisor.ledger.timeline import Timeline, build_timeline

COLOURS = {  # phase: (colour, legend label)
    "training": ("#cfe8cf", "training (productive)"),
    "checkpoint": ("#7fa7d9", "checkpoint save + commit"),
    "lost": ("#f08a8a", "lost work (recomputed later)"),
    "detection": ("#f6c48f", "recovery: shutdown, detection"),
    "restart": ("#f2a65a", "recovery: restart to first step"),
    "shutdown": ("#f6c48f", None),
    "queue": ("#d9d9d9", "queue / provisioning / start-up / tear-down"),
    "teardown": ("#d9d9d9", None),
    "startup": ("#d9d9d9", None),
    "provisioning": ("#d9d9d9", None),
}
_HATCH = {"lost": "///"}


def plot_timeline(events: list[Event], report: dict[str, Any], path: str | Path,
                  timeline: Timeline | None = None) -> Path:
    """Write a PNG of the run to `path` and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    tl = timeline or build_timeline(events)
    t0 = tl.t0
    fig, ax = plt.subplots(figsize=(12, 6), dpi=110)
    for seg in tl.segments:
        colour, _ = COLOURS.get(seg.phase, ("#ffffff", None))
        ax.axvspan(seg.start - t0, seg.end - t0, color=colour, hatch=_HATCH.get(seg.phase), lw=0,
                   alpha=0.9, zorder=0)

    # the step counter, one line per incarnation so a resume shows as a drop
    by_inc: dict[str, list[tuple[float, int]]] = {}
    for e in events:
        if e.kind in ("first_step", "progress", "checkpoint_saved") and e.get("step") is not None:
            by_inc.setdefault(e.incarnation, []).append((e.t - t0, int(e.get("step"))))
    for points in by_inc.values():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], color="black", lw=1.6, marker=".", ms=3, zorder=3)

    top = max((p[1] for pts in by_inc.values() for p in pts), default=1)
    for e in events:
        x = e.t - t0
        if e.kind == "checkpoint_committed":
            ax.plot([x], [e.get("step")], marker="D", color="#1f4e9c", ms=5, zorder=4)
    for ep in tl.interruptions:
        x = ep.t_loss - t0
        style = {"notice": ("#e67e00", "--"), "no_notice": ("#c0392b", "-"), "failure": ("#7b2cbf", ":")}[ep.cause]
        ax.axvline(x, color=style[0], ls=style[1], lw=2, zorder=5)
        label = {"notice": "preempted\n(notice)", "no_notice": "preempted\n(no notice)", "failure": "failure"}[ep.cause]
        ax.text(x, top * 1.22, " " + label, va="top", ha="left", fontsize=7, color=style[0], zorder=6)
    for t in tl.notices:
        ax.axvline(t - t0, color="#e67e00", ls=":", lw=1, zorder=5)

    goodput = report.get("goodput")
    gp = f"{goodput * 100:.1f}%" if isinstance(goodput, (int, float)) else "n/a"
    pre = report.get("preemptions", {})
    ax.set_title(f"goodput {gp}  ·  wall {report.get('wall_s', 0):.0f} s  ·  preemptions: "
                 f"{pre.get('notice', 0)} with notice, {pre.get('no_notice', 0)} without  ·  {report.get('state', '')}")
    ax.set_xlabel("wall time since launch (s)")
    ax.set_ylabel("training step")
    ax.set_xlim(0, max(tl.tend - t0, 1e-3))
    ax.set_ylim(0, top * 1.25 + 1)
    handles = [Patch(facecolor=c, hatch=_HATCH.get(p), label=label) for p, (c, label) in COLOURS.items() if label]
    handles += [
        Line2D([], [], color="black", marker=".", label="step counter"),
        Line2D([], [], color="#1f4e9c", marker="D", ls="", label="checkpoint committed"),
        Line2D([], [], color="#e67e00", ls="--", label="preempted with notice (dotted: notice)"),
        Line2D([], [], color="#c0392b", ls="-", label="preempted without notice"),
        Line2D([], [], color="#7b2cbf", ls=":", label="failure (crash, hang)"),
    ]
    fig.legend(handles=handles, loc="lower center", fontsize=8, ncol=5, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
