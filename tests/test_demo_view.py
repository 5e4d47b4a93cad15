"""The demo's progress view as a person reads it (pure: ledger events in, text out)."""

from supervisor.demo import _details, _step_and_loss
from supervisor.ledger.events import Event


def _ev(kind: str, t: float, **fields) -> Event:
    return Event(kind=kind, t=t, time="", writer="node0", incarnation="i1", fields=fields)


def test_the_loss_shown_is_the_newest_and_names_its_step_when_older_than_the_step_reached():
    events = [_ev("progress", 1.0, step=10, loss=3.5), _ev("progress", 2.0, step=20, loss=2.25)]
    assert _step_and_loss({"step": 20}, events) == (20, "loss 2.2500")
    # the job finished at 24, the trainer's last loss report was at 20: never shown as the loss of 24
    assert _step_and_loss({"step": 24}, events) == (24, "loss 2.2500 (step 20)")
    # a restart re-reports an earlier step later in time: the highest step's loss is the newest one
    events.append(_ev("progress", 3.0, step=12, loss=3.4))
    assert _step_and_loss({"step": 20}, events) == (20, "loss 2.2500")
    assert _step_and_loss({}, []) == (0, "loss -")


def test_event_details_keep_what_explains_the_event():
    e = _ev("exit", 5.0, code=75, reason="preempted; state saved and committed at step 12", saved_step=12,
            host="h", argv=["x"])
    assert _details(e) == "code=75, reason=preempted; state saved and committed at step 12, saved_step=12"
