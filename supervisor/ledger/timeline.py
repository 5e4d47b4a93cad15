"""Where the wall time of a run went, computed from its ledger events (pure functions).

The wall interval (launch -> job_finished, or the last event while the job
runs) is cut into consecutive segments, each with exactly one phase, by walking
the time-ordered events through a small state machine:

    queue         launch -> first node_start                 (waiting for machines)
    startup       first node_start -> first first_step        (initial trainer start-up)
    training      first_step -> loss (preempted / exit != 0 / recovery_started / finished)
      checkpoint    inside training: [t - duration_s, t] of checkpoint_saved (the loop waits for
                    the save); of checkpoint_committed / _uploaded (background: rank 0's committer
                    thread, DCP's async upload) only the part after the last step seen, when the
                    loop had stopped and waited for them (a notice's save, the end of training)
      lost          inside training: after the step that a later incarnation resumed from
    detection     loss -> recovery_started                    (the backend noticing)
    provisioning  recovery_started -> node_start              (waiting for machines again)
    restart       node_start -> first_step                     (restart, catalog, load, first step)

The report's five numbers are sums of segment lengths (queue_s = queue + startup
+ provisioning; recovery_s = detection + restart), so they add up to wall_s by
construction: every measured instant belongs to one segment. `residual_s` shows
the floating-point remainder. Productive time is measured the same way as the
others — training segments that are neither checkpoint nor later recomputed.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from supervisor.ledger.events import ACTIVITY_KINDS, Event

CATEGORY = {
    "queue": "queue", "startup": "queue", "provisioning": "queue",
    "detection": "recovery", "restart": "recovery", "shutdown": "recovery", "teardown": "queue",
    "training": "productive", "checkpoint": "checkpoint", "lost": "lost",
}
KEYS = ("productive", "checkpoint", "lost", "recovery", "queue")
# Between losing machines and training again, in order; an event marks where each one begins.
DETAILS = ("queue", "provisioning", "setup", "startup", "checkpoint_load", "first_step")
MARKS = {"backend_queued": "queue", "provisioning_started": "provisioning", "provisioned": "setup",
         "node_start": "startup", "trainer_ready": "checkpoint_load", "checkpoint_loaded": "first_step"}
_BASE_DETAIL = {"queue": "queue", "provisioning": "provisioning", "startup": "startup", "restart": "startup"}
# Google's goodput vocabulary (ml-goodput-measurement BadputType) over our phases.
BADPUT = {
    "infrastructure_recovery_from_disruption": ("detection", "shutdown", "recovery:provisioning",
                                                "recovery:queue"),
    "training_prep": ("setup",),
    "program_startup": ("startup", "first_step"),
    "unproductive_checkpoint_restore": ("checkpoint_load",),
    "unproductive_checkpoint_save": ("checkpoint",),
    "wasted_progress_from_disruption": ("lost",),
    "queue": ("queue", "provisioning"),
    "other": ("teardown",),
}


@dataclass
class Segment:
    start: float
    end: float
    phase: str
    detail: str = ""  # the finer phase inside a non-training one (DETAILS); "" = same as phase

    @property
    def length(self) -> float:
        return self.end - self.start


@dataclass
class Window:
    """One stretch of training by one incarnation, from its first step to its loss."""

    incarnation: str
    start: float
    first_step: int
    resume_step: int  # the step it loaded (0 = fresh)
    end: float = math.nan
    anchors: list[tuple[float, int]] = field(default_factory=list)  # (time a step completed, step)
    checkpoints: list[tuple[float, float]] = field(default_factory=list)  # saves: the loop waited for them
    keep_step: float = math.inf  # steps above this were recomputed later
    last_activity: float | None = None  # time of its last progress/checkpoint event
    lost_s: float = 0.0
    # commits and async uploads run beside the training loop (rank 0's committer thread, DCP's
    # async save): overhead only where the loop had stopped stepping and waited for them
    background: list[tuple[float, float]] = field(default_factory=list)

    @property
    def last_step(self) -> int:
        return max((s for _, s in self.anchors), default=self.first_step)


@dataclass
class Interruption:
    """One loss of the job and its way back."""

    t_loss: float
    cause: str = "failure"  # notice | no_notice | failure
    reason: str = ""
    saved_step: int | None = None
    t_recovery_started: float | None = None
    t_node_start: float | None = None
    t_back: float | None = None  # first_step again
    resumed_step: int | None = None
    lost_s: float = 0.0
    lost_steps: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # detection, DETAILS: loss -> first step again

    def to_dict(self) -> dict[str, Any]:
        back = None if self.t_back is None else self.t_back - self.t_loss
        return {"t_loss": self.t_loss, "cause": self.cause, "reason": self.reason, "saved_step": self.saved_step,
                "resumed_step": self.resumed_step, "lost_s": self.lost_s, "lost_steps": self.lost_steps,
                "loss_to_first_step_s": back, "phases": {f"{k}_s": v for k, v in self.phases.items()}}


@dataclass
class Timeline:
    t0: float
    tend: float
    state: str  # the job's final state, or "running"
    segments: list[Segment]
    windows: list[Window]
    interruptions: list[Interruption]
    notices: list[float]
    problems: list[str]


def _is_loss(e: Event) -> bool:
    """The trainer stopped here: a preemption, a failed exit, or a chaos kill (its exact moment)."""
    return (e.kind == "preempted" or (e.kind == "exit" and e.get("code", 0) != 0)
            or (e.kind == "chaos" and e.get("action") == "kill"))


def _cause(events: list[Event]) -> tuple[str, int | None]:
    """(notice | no_notice | failure, saved step): the first preemption signal decides the
    cause; later ones are teardown echoes from the surviving nodes."""
    cause, saved = "failure", None
    for e in events:
        if e.kind == "preempted":
            if cause == "failure":
                cause = "notice" if e.get("with_notice") else "no_notice"
            if cause == "notice" and e.get("saved_step") is not None:
                saved = e.get("saved_step")
        elif e.kind == "chaos" and cause == "failure":
            cause = "no_notice"
    return cause, saved


class _Walker:
    """The state machine of the module docstring; feeds on events in time order."""

    def __init__(self, t0: float):
        self.phase, self.since = "queue", t0
        self.segments: list[Segment] = []
        self.windows: list[Window] = []
        self.interruptions: list[Interruption] = []
        self.window: Window | None = None
        self.pending_loss: float | None = None  # a loss seen during training, maybe premature
        self.evidence: list[Event] = []
        self.resume: int | None = None
        self.episode: Interruption | None = None  # the interruption being recovered from
        self.ended: set[str] = set()  # incarnations whose training is over
        self.current: str | None = None  # label of the incarnation now starting or training

    def _switch(self, t: float, phase: str) -> None:
        if t > self.since:
            self.segments.append(Segment(self.since, t, self.phase))
        self.phase, self.since = phase, max(t, self.since)

    def _close_window(self, t: float, phase: str) -> float:
        """End training (or start-up) at the pending loss, or at t; open a new interruption.

        After a save on notice the trainer computes nothing more: from its last event to the
        loss it is shutting down (recovery), not working."""
        end = min(self.pending_loss, t) if self.pending_loss is not None else t
        if self.pending_loss is None and self.window is not None and self.window.last_activity is not None:
            end = self.window.last_activity  # a loss nobody reported: the last sign of life
        if self.window is not None:
            cause, saved = _cause(self.evidence)
            stop = self.window.last_activity
            if cause == "notice" and saved is not None and stop is not None and stop < end:
                self._end_window(stop, "shutdown")
            else:
                self._end_window(end, phase)
        self._switch(end, phase)
        return end

    def _end_window(self, t: float, phase: str) -> None:
        self.window.end = t
        self.ended.add(self.window.incarnation)
        self.windows.append(self.window)
        self.window = None
        self._switch(t, phase)

    def _open_episode(self, t_loss: float) -> None:
        self.episode = Interruption(t_loss=t_loss)
        self.interruptions.append(self.episode)
        self._absorb(self.evidence)
        self.evidence, self.pending_loss = [], None

    def _absorb(self, events: list[Event]) -> None:
        ep = self.episode
        cause, saved = _cause(events)
        if ep.cause == "failure":
            ep.cause = cause
        if ep.cause == "notice" and saved is not None:
            ep.saved_step = saved
        for e in events:
            if not ep.reason:
                ep.reason = str(e.get("reason") or (f"exit code {e.get('code')}" if e.kind == "exit" else e.kind))

    def feed(self, e: Event) -> None:
        k, t = e.kind, e.t
        in_run = self.phase in ("training", "startup", "restart")
        fresh = e.incarnation not in self.ended or e.incarnation == self.current
        if in_run and _is_loss(e) and fresh:
            if self.pending_loss is None:
                self.pending_loss = t
            self.evidence.append(e)
            step = e.get("step")
            if self.window is not None and isinstance(step, int) and step >= self.window.last_step:
                self.window.anchors.append((t, step))  # the step the trainer had reached when it was lost
        elif self.phase in ("detection", "provisioning") and _is_loss(e):
            self._absorb([e])  # a survivor's exit may land after the backend noticed the loss
        elif k == "recovery_started":
            if in_run:
                self._open_episode(self._close_window(t, "detection"))
            if self.phase == "detection":
                self._switch(t, "provisioning")
                self.episode.t_recovery_started = t
                if not self.episode.reason:
                    self.episode.reason = str(e.get("reason") or "")
        elif k == "node_start":
            if self.phase in ("queue", "detection", "provisioning"):
                self.current = e.incarnation
            if self.phase == "queue":
                self._switch(t, "startup")
            elif self.phase in ("detection", "provisioning"):
                self._switch(t, "restart")
                self.episode.t_node_start, self.resume = t, None
            elif self.phase == "training" and self.window and e.incarnation not in (self.window.incarnation,):
                # a new incarnation started without a recovery_started event
                self._open_episode(self._close_window(t, "detection"))
                self.current = e.incarnation
                self._switch(t, "restart")
                self.episode.t_node_start, self.resume = t, None
        elif k == "resume" and (self.phase in ("startup", "restart") or
                                (self.phase != "training" and e.incarnation not in self.ended)):
            self.resume = int(e.get("step", 0))
        elif (k in ("first_step", "progress") and self.phase != "training"
              and (self.phase in ("queue", "startup", "restart") or e.incarnation not in self.ended)):
            # after a node_start, even a reused incarnation label is a new start; a missing
            # first_step is stood in for by the first progress event
            step = int(e.get("step"))
            resume = self.resume if self.resume is not None else step - 1
            self.window = Window(e.incarnation, t, step, resume, anchors=[(t, step)])
            self.current = e.incarnation
            self.pending_loss, self.evidence = None, []
            if self.episode is not None and self.phase != "queue" and self.phase != "startup":
                self.episode.t_back, self.episode.resumed_step = t, resume
            self._switch(t, "training")
        elif self.phase == "training" and k in ACTIVITY_KINDS and e.incarnation == self.window.incarnation:
            self.pending_loss = None  # still training: the earlier loss signal was premature
            self.window.last_activity = t
            step = int(e.get("step"))
            if k == "progress":
                self.window.anchors.append((t, step))
            else:
                start = t - max(0.0, float(e.get("duration_s")))
                if k == "checkpoint_saved":
                    self.window.checkpoints.append((start, t))
                    self.window.anchors.append((start, step))
                else:
                    self.window.background.append((start, t))

    def finish(self, tend: float, succeeded: bool) -> None:
        if self.phase in ("training", "startup", "restart"):
            if self.pending_loss is not None:
                self._open_episode(self._close_window(tend, "detection"))
            elif self.window is not None:
                # a finished trainer's last event is its last step: the rest is tear-down
                stop = self.window.last_activity if succeeded else None
                self._end_window(stop if stop is not None else tend, "teardown")
        self._switch(tend, self.phase)


def _step_time(window: Window, step: float) -> float | None:
    """When `step` had completed in this window (linear between anchors); None if never."""
    anchors = sorted(window.anchors)
    if step < window.first_step:
        return window.start
    exact = [t for t, s in anchors if s == step]
    if exact:
        return min(exact)
    before = [(t, s) for t, s in anchors if s < step]
    after = [(t, s) for t, s in anchors if s > step]
    if not after:
        return None
    (ta, sa), (tb, sb) = before[-1], after[0]
    return ta + (step - sa) / (sb - sa) * (tb - ta)


def _union(intervals: list[tuple[float, float]], lo: float, hi: float) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in intervals):
        if b <= a:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _split_training(window: Window) -> list[Segment]:
    """Training window -> training / checkpoint / lost segments that tile it exactly."""
    lo, hi = window.start, window.end
    stepping = max((t for t, _ in window.anchors), default=lo)  # the last step seen completed
    ckpts = _union(window.checkpoints + [(max(a, stepping), b) for a, b in window.background], lo, hi)
    t_keep = hi
    if window.keep_step < math.inf:
        found = _step_time(window, window.keep_step)
        t_keep = hi if found is None else min(max(found, lo), hi)
    cuts = sorted({lo, hi, t_keep, *(x for c in ckpts for x in c)})
    out: list[Segment] = []
    # Past the resume point: recomputed work, unless nothing was computed past it (a save on
    # notice of the step it stops at: the gaps between its save and commit are checkpoint time).
    after_keep = "lost" if window.last_step > window.keep_step else "checkpoint"
    for a, b in zip(cuts, cuts[1:]):
        mid = (a + b) / 2
        phase = ("checkpoint" if any(ca <= mid <= cb for ca, cb in ckpts)
                 else after_keep if mid >= t_keep else "training")
        if out and out[-1].phase == phase:
            out[-1].end = b
        else:
            out.append(Segment(a, b, phase))
    window.lost_s = sum(s.length for s in out if s.phase == "lost")
    return out


def build_timeline(events: list[Event]) -> Timeline:
    """Events (any order) -> the segments that tile the run's wall time."""
    problems: list[str] = []
    events = sorted(events, key=lambda e: (e.t, e.writer, e.seq))
    if not events:
        return Timeline(0.0, 0.0, "unknown", [], [], [], [], ["no events"])
    launches = [e for e in events if e.kind == "launch"]
    if launches:
        # the launch event is written once the backend accepted the job: a fast backend may
        # already have queued it (SkyPilot's PENDING row) or started a node by then
        t0 = min(launches[0].t, events[0].t)
    else:
        t0 = events[0].t
        problems.append("no launch event: wall time starts at the first event")
    finished = [e for e in events if e.kind == "job_finished" and e.t >= t0]
    tend = finished[0].t if finished else events[-1].t
    state = str(finished[0].get("state", "finished")) if finished else "running"
    if finished and finished[-1].t < events[-1].t:
        problems.append(f"{sum(e.t > tend for e in events)} event(s) after job_finished were ignored")

    walker = _Walker(t0)
    for e in events:
        if t0 <= e.t <= tend:
            walker.feed(e)
    walker.finish(tend, succeeded=state.upper() in ("SUCCEEDED", "FINISHED", "DONE"))

    # A step computed in window j was wasted if any later incarnation resumed below it.
    windows = walker.windows
    for j, w in enumerate(windows):
        later = [v.resume_step for v in windows[j + 1:]]
        w.keep_step = min(later, default=math.inf)
    segments: list[Segment] = []
    for seg in walker.segments:
        if seg.phase != "training":
            segments.append(seg)
            continue
        for w in windows:
            if w.start <= seg.start < w.end or (w.start == seg.start == w.end):
                w_clip = Window(w.incarnation, seg.start, w.first_step, w.resume_step, min(seg.end, w.end),
                                w.anchors, w.checkpoints, w.keep_step, background=w.background)
                segments.extend(_split_training(w_clip))
                w.lost_s = w_clip.lost_s
                break
        else:
            segments.append(seg)
    segments = _detail(segments, [e for e in events if t0 <= e.t <= tend])
    _charge_losses(windows, walker.interruptions)
    for ep in walker.interruptions:
        end = ep.t_back if ep.t_back is not None else tend
        for seg in segments:
            if seg.phase not in ("training", "checkpoint", "lost") and ep.t_loss <= seg.start < end:
                ep.phases[seg.detail] = ep.phases.get(seg.detail, 0.0) + seg.length
    notices = [e.t for e in events if e.kind == "notice" and t0 <= e.t <= tend]
    return Timeline(t0, tend, state, segments, windows, walker.interruptions, notices, problems)


def recomputed_steps(w: Window) -> int:
    """Steps this window computed that a later incarnation had to compute again."""
    return max(0, w.last_step - max(w.keep_step, w.resume_step)) if w.keep_step < math.inf else 0


def _charge_losses(windows: list[Window], interruptions: list[Interruption]) -> None:
    """Charge each window's recomputed work to the restart that resumed below it: usually the
    interruption that ended it, but a later fallback (a corrupt newest checkpoint) owns what
    it threw away, not the notice before it that saved everything."""
    for w in windows:
        if w.keep_step == math.inf or not (w.lost_s or recomputed_steps(w)):
            continue
        culprit = next((ep for ep in interruptions if ep.t_back is not None and ep.t_back >= w.end
                        and ep.resumed_step == w.keep_step), None)
        if culprit is not None:
            culprit.lost_s += w.lost_s
            culprit.lost_steps += recomputed_steps(w)


def _detail(segments: list[Segment], events: list[Event]) -> list[Segment]:
    """Cut the waiting and starting segments at the events that mark the finer phases (DETAILS).

    Each segment starts in its own base detail; a mark inside it only moves forward in
    DETAILS (several nodes report the same milestone at slightly different times). A
    `setup` event covers [t - duration_s, t]: SkyPilot's own runtime setup between
    `provisioned` and it counts as setup too; after it, start-up."""
    marks: list[tuple[float, str]] = [(e.t, MARKS[e.kind]) for e in events if e.kind in MARKS]
    for e in events:
        if e.kind == "setup":
            marks += [(e.t - max(0.0, float(e.get("duration_s"))), "setup"), (e.t, "startup")]
    marks.sort()
    out: list[Segment] = []
    for seg in segments:
        base = _BASE_DETAIL.get(seg.phase)
        if base is None:
            out.append(Segment(seg.start, seg.end, seg.phase, seg.detail or seg.phase))
            continue
        detail, since = base, seg.start
        for t, mark in marks:
            if seg.start < t < seg.end and DETAILS.index(mark) > DETAILS.index(detail):
                if t > since:
                    out.append(Segment(since, t, seg.phase, detail))
                detail, since = mark, t
        out.append(Segment(since, seg.end, seg.phase, detail))
    return out


def _phase_sums(tl: Timeline) -> dict[str, dict[str, float]]:
    """Seconds per finer phase (DETAILS), for the first start and summed over all recoveries."""
    first = tl.windows[0].start if tl.windows else tl.tend
    start = {f"{d}_s": 0.0 for d in DETAILS}
    recovery = {"detection_s": 0.0, "shutdown_s": 0.0, **{f"{d}_s": 0.0 for d in DETAILS}}
    for seg in tl.segments:
        if seg.phase in ("training", "checkpoint", "lost", "teardown"):
            continue
        table = start if seg.end <= first + 1e-9 else recovery
        table[f"{seg.detail}_s"] = table.get(f"{seg.detail}_s", 0.0) + seg.length
    return {"start": start, "recovery": recovery}


def _badput(tl: Timeline) -> dict[str, float]:
    """Wall time outside productive training, in Google's goodput vocabulary (BADPUT)."""
    first = tl.windows[0].start if tl.windows else tl.tend
    out = {f"{k}_s": 0.0 for k in BADPUT}
    for seg in tl.segments:
        if seg.phase == "training":
            continue
        name = seg.detail or seg.phase
        keys = [name] if seg.end <= first + 1e-9 or seg.phase not in ("provisioning", "queue") else [
            f"recovery:{name}", name]
        bucket = next((k for k, names in BADPUT.items() for key in keys if key in names), "other")
        out[f"{bucket}_s"] += seg.length
    return out


def _checkpoint_stats(events: list[Event]) -> dict[str, Any]:
    """Per checkpoint step: the longest save and commit any writer measured."""
    saves: dict[int, float] = {}
    commits: dict[int, float] = {}
    for e in events:
        if e.kind in ("checkpoint_saved", "checkpoint_committed"):
            table = saves if e.kind == "checkpoint_saved" else commits
            step = int(e.get("step"))
            table[step] = max(table.get(step, 0.0), float(e.get("duration_s")))
    steps = sorted(set(saves) | set(commits))
    costs = [saves.get(s, 0.0) + commits.get(s, 0.0) for s in steps]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"saved": len(saves), "committed": len(commits), "mean_save_s": mean(list(saves.values())),
            "mean_commit_s": mean(list(commits.values())), "mean_cost_s": mean(costs)}


def young_daly(save_cost_s: float | None, mtbf_s: float | None) -> float | None:
    """Optimal checkpoint interval sqrt(2 * C * MTBF) (Young 1974; Daly 2006, first order)."""
    if not save_cost_s or not mtbf_s:
        return None
    return math.sqrt(2.0 * save_cost_s * mtbf_s)


def work_losing(interruptions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The interruptions that count toward the MTBF: all but preemptions saved on notice,
    which cost no recomputation whatever the interval."""
    return [ep for ep in interruptions if not (ep["cause"] == "notice" and ep["saved_step"] is not None)]


def configured_interval(events: list[Event]) -> int | None:
    """The checkpoint interval (steps) the newest incarnation was started with: the `resume`
    event's `checkpoint_interval` (auto), else `--checkpoint.interval` in trainer_start's command."""
    for e in reversed(events):
        if e.kind == "resume" and isinstance(e.get("checkpoint_interval"), int):
            return e.get("checkpoint_interval")
        if e.kind == "trainer_start" and isinstance(e.get("command"), list):
            argv = [str(a) for a in e.get("command")]
            for flag, value in zip(argv, argv[1:]):
                if flag == "--checkpoint.interval" and value.isdigit():
                    return int(value)
            for arg in argv:
                if arg.startswith("--checkpoint.interval=") and arg.split("=", 1)[1].isdigit():
                    return int(arg.split("=", 1)[1])
    return None


def _advice(tl: Timeline, totals: dict[str, float], ckpt: dict[str, Any], steps: dict[str, Any],
            events: list[Event]) -> dict[str, Any]:
    """Checkpoint interval advice (Young/Daly), against the interval the run is configured with."""
    unsaved = work_losing([ep.to_dict() for ep in tl.interruptions])
    held = tl.tend - tl.t0 - totals["queue_wait"]
    mean_step = steps["mean_step_s"]
    current_steps = configured_interval(events)
    current_s = current_steps * mean_step if current_steps and mean_step else None
    out: dict[str, Any] = {"mtbf_s": None, "interruptions_counted": len(unsaved), "save_cost_s": ckpt["mean_cost_s"],
                           "interval_s": None, "interval_steps": None, "current_interval_s": current_s,
                           "current_interval_steps": current_steps}
    if not unsaved:
        saved = len(tl.interruptions)
        out["message"] = "not enough preemptions observed" + (
            f" (all {saved} interruption(s) were saved on notice and lost no work)" if saved else "")
        return out
    if not ckpt["mean_cost_s"]:
        out["message"] = "no checkpoint save was measured"
        return out
    out["mtbf_s"] = held / len(unsaved)
    out["interval_s"] = young_daly(ckpt["mean_cost_s"], out["mtbf_s"])
    if mean_step:
        out["interval_steps"] = max(1, round(out["interval_s"] / mean_step))
    now = ""
    if current_steps:
        now = f"; now every {current_steps} steps" + (f" (~{current_s:.0f} s)" if current_s else "")
    steps_txt = f"~{out['interval_steps']} steps " if out["interval_steps"] else ""
    out["message"] = (f"checkpoint every {steps_txt}(~{out['interval_s']:.0f} s): save cost "
                      f"{ckpt['mean_cost_s']:.2f} s, MTBF {out['mtbf_s']:.0f} s over {len(unsaved)} "
                      f"work-losing interruption(s){now}")
    return out


def _nodes(events: list[Event]) -> int:
    for kind in ("resources", "launch"):
        for e in events:
            if e.kind == kind and e.get("num_nodes"):
                return int(e.get("num_nodes"))
    counts = [int(e.get("num_nodes")) for e in events if e.kind == "node_start" and e.get("num_nodes")]
    if counts:
        return max(counts)
    per_inc: dict[str, set] = {}
    for e in events:
        if e.kind == "node_start":
            per_inc.setdefault(e.incarnation, set()).add(e.get("node_rank", e.writer))
    return max((len(v) for v in per_inc.values()), default=1)


def used(events: list[Event]) -> dict[str, Any] | None:
    """What to price: {accelerators, spot, cloud, region}. The backend's record of what ran
    (`resources`) wins over what the launch asked for; None when neither is known."""
    launch = next((e for e in events if e.kind == "launch"), None)
    record = next((e for e in events if e.kind == "resources"), None)
    if launch is None and record is None:
        return None
    out = {"accelerators": None, "spot": None, "cloud": None, "region": None}
    if launch is not None:
        infra = (launch.get("infra") or "").split("/")
        out.update(accelerators=launch.get("accelerators"), spot=launch.get("spot"),
                   cloud=infra[0] or None, region=infra[1] if len(infra) > 1 and infra[1] != "*" else None)
    if record is not None:
        if "accelerators" in record.fields:  # null there means CPU; absent means unknown
            out["accelerators"] = record.fields["accelerators"]
        for key in ("spot", "cloud", "region"):
            if record.get(key) is not None:
                out[key] = record.get(key)
    out["cloud"] = out["cloud"].lower() if out["cloud"] else None
    return out


def held_by_start(tl: Timeline, starts: list[float]) -> list[list[float]]:
    """(held s, badput s) of each start: the segments that hold machines (all but queue and
    provisioning), each charged to the start it began in; detection goes to the start it ends."""
    held = [[0.0, 0.0] for _ in starts]
    for seg in tl.segments:
        if seg.phase in ("queue", "provisioning"):
            continue
        k = max(0, bisect.bisect_right(starts, seg.start) - 1)
        held[k][0] += seg.length
        held[k][1] += seg.length if CATEGORY[seg.phase] in ("lost", "recovery", "checkpoint") else 0.0
    return held


def start_resources(events: list[Event], starts: list[float]) -> list[dict[str, Any]] | None:
    """What each start ran on and whose record says so (`resources_from`): its nodes' own
    node_start (cloud, region of that launch, ledger.skypilot.placement) over SkyPilot's record,
    which describes the newest launch only (see ledger.skypilot), over the run's (launch event)."""
    run = used(events)
    if run is None:
        return None
    has_record = any(e.kind == "resources" for e in events)
    out = []
    for k, t in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else math.inf
        res = {**run, "resources_from": "skypilot" if has_record and k == len(starts) - 1 else "run"}
        node = next((e for e in events if e.kind == "node_start" and t <= e.t < end and e.get("cloud")), None)
        if node is not None:
            res.update(cloud=node.get("cloud").lower(), region=node.get("region"), resources_from="node")
        out.append(res)
    return out


def accelerators_of(events: list[Event]) -> dict[str, int] | None:
    """The accelerators the run used or asked for (None = CPU or unknown)."""
    known = used(events)
    return known["accelerators"] if known else None


def accelerator_label(accelerators: dict[str, int] | None) -> str:
    """{"H100": 8, "H200": 8} -> "H100:8 or H200:8"; None -> "CPU"."""
    return " or ".join(f"{k}:{v}" for k, v in accelerators.items()) if accelerators else "CPU"


def cost(node_hours: float, spot_price: float, on_demand_price: float, badput_hours: float,
         source: str) -> dict[str, Any]:
    """Spot cost of the node-hours the run held vs the same hours on demand."""
    spot, on_demand = node_hours * spot_price, node_hours * on_demand_price
    return {"node_hours": node_hours, "price_source": source, "spot_usd_per_node_hour": spot_price,
            "on_demand_usd_per_node_hour": on_demand_price, "spot_usd": spot, "on_demand_usd": on_demand,
            "savings_usd": on_demand - spot, "badput_spot_usd": badput_hours * spot_price}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat()


def priced_starts(tl: Timeline, events: list[Event], nodes: int, price_of) -> list[dict[str, Any]]:
    """Each start of the job (0 = the first, n = after the n-th loss) with its resources and
    its own cost; `price_of(resources)` -> prices.Price, or None to leave costs out. A start
    begins at the run's start or at a recovery's first node_start."""
    starts = [tl.t0] + [ep.t_node_start for ep in tl.interruptions if ep.t_node_start is not None]
    resources = start_resources(events, starts) or [{"resources_from": None}] * len(starts)
    out = []
    for k, (t, (held_s, badput_s), res) in enumerate(zip(starts, held_by_start(tl, starts), resources)):
        entry = {"start": k, "started_at": _iso(t), "node_hours": nodes * held_s / 3600.0, **res, "cost": None}
        price = price_of(res) if price_of is not None else None
        if price is not None:
            entry["cost"] = cost(entry["node_hours"], price.spot, price.on_demand, nodes * badput_s / 3600.0,
                                 price.source)
        out.append(entry)
    return out


def total_cost(starts: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's cost: the sum of its starts' (`cost` keys); prices per node-hour are the held-time
    weighted mean, and the source lists every source used."""
    costs = [s["cost"] for s in starts]
    hours = sum(c["node_hours"] for c in costs)
    mean = lambda key: (sum(c[key] * c["node_hours"] for c in costs) / hours if hours  # noqa: E731
                        else costs[-1][key])
    sources = list(dict.fromkeys(c["price_source"] for c in costs))
    total = cost(hours, mean("spot_usd_per_node_hour"), mean("on_demand_usd_per_node_hour"), 0.0,
                 sources[0] if len(sources) == 1 else "per start: " + "; ".join(sources))
    total["badput_spot_usd"] = sum(c["badput_spot_usd"] for c in costs)
    return total


def summarize(events: list[Event], problems: list[str] | None = None, price=None, price_of=None) -> dict[str, Any]:
    """The report object (JSON-ready). `price`: one price for every start (prices.Price: .spot,
    .on_demand, .source); `price_of(resources)`: each start's own, from its entry in `incarnations`."""
    tl = build_timeline(events)
    by_phase: dict[str, float] = {}
    for s in tl.segments:
        by_phase[s.phase] = by_phase.get(s.phase, 0.0) + s.length
    totals = {k: 0.0 for k in KEYS}
    for phase, length in by_phase.items():
        totals[CATEGORY[phase]] += length
    wall = tl.tend - tl.t0
    totals["queue_wait"] = by_phase.get("queue", 0.0) + by_phase.get("provisioning", 0.0)

    productive_steps = sum(max(0, min(w.last_step, w.keep_step) - w.resume_step) for w in tl.windows)
    recomputed = sum(recomputed_steps(w) for w in tl.windows)
    steps = {"first": tl.windows[0].first_step if tl.windows else None,
             "last": max((w.last_step for w in tl.windows), default=None),
             "productive": productive_steps, "recomputed": recomputed,
             "mean_step_s": totals["productive"] / productive_steps if productive_steps else None}
    events = [e for e in events if tl.t0 <= e.t <= tl.tend]
    ckpt = _checkpoint_stats(events)
    nodes = _nodes(events)
    accelerators = accelerators_of(events)
    known = used(events)
    if price_of is None and price is not None:
        price_of = lambda _resources: price  # noqa: E731
    starts = priced_starts(tl, events, nodes, price_of)

    report: dict[str, Any] = {
        "state": tl.state,
        "start": tl.t0, "end": tl.tend, "started_at": _iso(tl.t0), "ended_at": _iso(tl.tend),
        "wall_s": wall,
        "productive_s": totals["productive"],
        "checkpoint_s": totals["checkpoint"],
        "lost_s": totals["lost"],
        "recovery_s": totals["recovery"],
        "queue_s": totals["queue"],
        "residual_s": wall - sum(totals[k] for k in KEYS),
        "goodput": totals["productive"] / wall if wall > 0 else None,
        "breakdown": {f"{p}_s": by_phase.get(p, 0.0) for p in CATEGORY},
        "phases": _phase_sums(tl),
        "badput": _badput(tl),
        "preemptions": {"notice": sum(ep.cause == "notice" for ep in tl.interruptions),
                        "no_notice": sum(ep.cause == "no_notice" for ep in tl.interruptions)},
        "failures": sum(ep.cause == "failure" for ep in tl.interruptions),
        "recoveries": sum(ep.t_back is not None for ep in tl.interruptions),
        "interruptions": [ep.to_dict() for ep in tl.interruptions],
        "steps": steps,
        "checkpoints": ckpt,
        "nodes": nodes,
        "accelerators": accelerator_label(accelerators),
        "spot": known["spot"] if known else None,
        "advice": _advice(tl, totals, ckpt, steps, events),
        "cost": total_cost(starts) if all(s["cost"] for s in starts) else None,
        "incarnations": starts,
        "events": len(events),
        "problems": list(problems or []) + tl.problems,
    }
    return report
