"""Pure decisions of the trainer hooks: save-time estimate, what to do on a
notice, when to report progress. No I/O, no torch: tested without processes."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from supervisor.contract.runtime import DEFAULT_COMMIT_WAIT_S

# A save on notice must fit before the deadline with room to spare: the
# estimate is scaled by SAVE_MARGIN and EXIT_SLACK_S is added for the commit
# marker, TorchTitan's 2 s end-of-training pause and process teardown.
SAVE_MARGIN = 1.5
EXIT_SLACK_S = 3.0
# A checkpoint file read from an object store (supervisor.titan.store_reader): GETs
# of this many bytes, this many in flight. benchmarks/dcp_store.py measures them.
LOAD_PART_BYTES = 16 * 2**20
LOAD_PARALLEL = 8


class SaveTimer:
    """Moving averages of the last few measured saves of this run, notice to
    committed (the save to storage, plus, through a mount, the wait for its
    upload; the commit itself is a listing), kept apart per kind of save
    (`save_kind`): an async save through a mount and a sync one straight to the
    bucket cost different amounts."""

    def __init__(self, window: int = 5):
        self._window = window
        self._samples: dict[str, deque[float]] = {}

    def add(self, seconds: float, kind: str = "") -> None:
        self._samples.setdefault(kind, deque(maxlen=self._window)).append(float(seconds))

    def expected(self, kind: str | None = None) -> float | None:
        """Mean of the recent durations of `kind` (of any kind when it has none yet,
        or when `kind` is None); None before the first save."""
        samples = self._samples.get(kind) if kind is not None else None
        if not samples:
            samples = [s for q in self._samples.values() for s in q]
        return sum(samples) / len(samples) if samples else None


def save_kind(sync: bool, mounted: bool) -> str:
    """The SaveTimer key of a save: "sync|async" + "/direct|mount"."""
    return f"{'sync' if sync else 'async'}/{'mount' if mounted else 'direct'}"


@dataclass(frozen=True)
class NoticePlan:
    save: bool
    reason: str


def notice_plan(now: float, deadline: float | None, expected_save_s: float | None) -> NoticePlan:
    """Save at this step boundary, or skip and rely on the last committed step.

    Without a deadline, or before any save was measured, saving is the only
    way not to lose work, so it is tried. With both, the save must fit.
    """
    if deadline is None:
        return NoticePlan(True, "notice without deadline: saving")
    left = deadline - now
    if expected_save_s is None:
        return NoticePlan(True, f"{left:.1f} s to the deadline, save time not measured yet: saving")
    need = SAVE_MARGIN * expected_save_s + EXIT_SLACK_S
    if left >= need:
        return NoticePlan(True, f"{left:.1f} s to the deadline, save needs ~{need:.1f} s: saving")
    return NoticePlan(
        False,
        f"{left:.1f} s to the deadline but a save needs ~{need:.1f} s "
        f"(measured {expected_save_s:.2f} s): skipping the save, the last committed step stands",
    )


def early_save_plan(step: int, last_saved_step: int | None, loaded_step: int) -> NoticePlan:
    """At an early notice (AWS's rebalance recommendation): save this step and train
    on, unless it is already on storage; the interruption notice that may follow then
    loses nothing (its step is saved, or it saves a newer one)."""
    if step == 0:
        return NoticePlan(False, "no training step completed yet")
    if last_saved_step == step or step == loaded_step:
        return NoticePlan(False, f"step {step} already saved")
    return NoticePlan(True, f"saving step {step} and training on")


class Throttle:
    """True at most once per `every_s` seconds or `every_steps` steps."""

    def __init__(self, every_s: float = 10.0, every_steps: int = 100):
        self.every_s, self.every_steps = every_s, every_steps
        self._last_t: float | None = None
        self._last_step = 0

    def due(self, now: float, step: int) -> bool:
        if self._last_t is None or now - self._last_t >= self.every_s or step - self._last_step >= self.every_steps:
            self._last_t, self._last_step = now, step
            return True
        return False


def commit_wait_s(env_value: str | None, same_place: bool) -> float:
    """How long a commit polls the store for the step's objects: 0 when TorchTitan
    writes straight to the catalog URL, else $SUPERVISE_COMMIT_WAIT_S (default: the recipe's, 600 s),
    since through a mount the objects reach the store after the save returns."""
    if same_place:
        return 0.0
    return float(env_value) if env_value else DEFAULT_COMMIT_WAIT_S


def resume_load_step(env_value: str | None, configured: int) -> int | None:
    """The step the checkpoint manager loads, from $SUPERVISE_RESUME_STEP.

    "none" (the catalog has no verified step): None, load no step folder at
    all, since TorchTitan's own guess with load_step -1 is the highest step-N
    with a .metadata, committed or not. An integer: exactly that step. Unset
    (plain torchrun): TorchTitan's `configured` load_step, guess included.
    """
    if env_value is None or not env_value.strip():
        return configured
    value = env_value.strip().lower()
    if value == "none":
        return None
    step = int(value)
    if step < 0:
        raise ValueError(f"resume step must be >= 0 or 'none', got {env_value!r}")
    return step


COMM_MARGIN_S = 60.0  # collective timeout beyond rank 0's commit budget at the end
STORE_MARGIN_S = 120.0  # a commit's store calls, each bounded by the retry policy's deadline


def save_comm_timeout_s(expected_save_s: float | None, init_s: float, train_s: float) -> float:
    """The collective timeout while a save runs: DCP's save gathers the ranks'
    write results, so a rank waits there as long as the slowest rank writes --
    legitimately longer than `comm.train_timeout_seconds` (100 s) for a large
    checkpoint written straight to a bucket. TorchTitan's start-up timeout, or
    three times the measured save, whichever is longer."""
    return max(init_s, train_s, 3.0 * (expected_save_s or 0.0))


def commit_budget_s(now: float, deadline: float | None, commit_wait_s: float, measured_commit_s: float | None = None) -> float:
    """How long rank 0 waits at the end of training for its pending commits:
    until EXIT_SLACK_S before a notice's deadline, else the commit's own bound,
    which scales with this run's measured commits (through a mount a commit waits
    for the upload: minutes at 100 GB): the wait for a mount's upload or three
    measured commits, whichever is longer, plus the store calls."""
    if deadline is not None:
        return max(0.0, deadline - now - EXIT_SLACK_S)
    return max(commit_wait_s, 3.0 * (measured_commit_s or 0.0)) + STORE_MARGIN_S
