"""`checkpoint.interval: auto`: the Young/Daly interval in steps, from what the ledger measured.

At each (re)start the node wrapper reads the run's ledger and asks `from_ledger`
for the interval it passes TorchTitan (`--checkpoint.interval N`):

    interval_s = sqrt(2 * C * MTBF)      (Young 1974; Daly 2006, first order)
    N = round(interval_s / step_s), clamped to the recipe's [low, high]

C is the measured save + commit cost per checkpoint, step_s the measured time per
productive step, MTBF the held (non-queue) wall time per *work-losing*
interruption (a preemption saved on notice loses nothing, whatever the interval).
With no such interruption yet, the time survived so far is used as the MTBF: a
lower bound, so the interval grows as the run proves stable. With no save or
step measured yet (the first start), the low end: checkpoint often until the
cost is known.
"""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.ledger.events import Event


@dataclass(frozen=True)
class IntervalChoice:
    steps: int
    reason: str  # one line for the resume line and the ledger
    save_cost_s: float | None = None
    mtbf_s: float | None = None
    step_s: float | None = None

    def fields(self) -> dict:
        """The `resume` event's fields that record the choice."""
        return {"checkpoint_interval": self.steps, "interval_source": "auto", "interval_reason": self.reason}


def choose(save_cost_s: float | None, mtbf_s: float | None, step_s: float | None, low: int, high: int,
           *, interruptions: int = 0) -> IntervalChoice:
    """The clamped Young/Daly interval in steps for the measured numbers."""
    from supervisor.ledger.timeline import young_daly

    if low < 1 or high < low:
        raise ValueError(f"interval range [{low}, {high}] must satisfy 1 <= low <= high")
    if not save_cost_s or not step_s or not mtbf_s:
        return IntervalChoice(low, f"auto: {low} steps (no save or step measured yet: the range's low end)")
    ideal_s = young_daly(save_cost_s, mtbf_s)
    steps = min(high, max(low, round(ideal_s / step_s)))
    seen = (f"MTBF {mtbf_s:.0f} s over {interruptions} work-losing interruption(s)" if interruptions
            else f"no work-losing interruption in {mtbf_s:.0f} s (taken as the MTBF)")
    clamp = "" if steps == round(ideal_s / step_s) else f", clamped to [{low}, {high}]"
    return IntervalChoice(steps, f"auto: {steps} steps (Young/Daly {ideal_s:.0f} s: save+commit {save_cost_s:.2f} s, "
                                 f"{seen}, {step_s:.3f} s/step{clamp})", save_cost_s, mtbf_s, step_s)


def from_ledger(events: list[Event], low: int, high: int) -> IntervalChoice:
    """The interval for the next incarnation of the run whose ledger holds `events`."""
    from supervisor.ledger.timeline import summarize, work_losing

    if not events:
        return choose(None, None, None, low, high)
    r = summarize(events)
    held = r["wall_s"] - r["breakdown"]["queue_s"] - r["breakdown"]["provisioning_s"]
    losing = work_losing(r["interruptions"])
    mtbf = held / len(losing) if losing else held
    return choose(r["checkpoints"]["mean_cost_s"], mtbf, r["steps"]["mean_step_s"], low, high,
                  interruptions=len(losing))


def for_run(ledger_url: str, low: int, high: int) -> IntervalChoice:
    """from_ledger() on the run's stored journal; an unreadable ledger gives the low end, said so."""
    from supervisor.ledger.merged import run_events

    events, problems, _run = run_events(ledger_url)  # what status and report read
    if not events and problems and not problems[0].startswith("no journal"):
        return IntervalChoice(low, f"auto: {low} steps (ledger unreadable: {problems[0]}; the range's low end)")
    return from_ledger(events, low, high)
