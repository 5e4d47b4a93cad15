"""The progress budget's rules (supervisor/node/budget.py): plain functions of the record."""

from supervisor.contract.exitcodes import ExitCode
from supervisor.node import budget

TT = ["--module", "llama3", "--config", "llama3_debugmodel"]
CRASH = "torchrun failed (exit 1)"


def _run(record, *incarnations):
    """Play incarnations (start step, exit code, step committed at the end; None = vanished)
    through the same calls the wrapper makes, and return the verdict for the next start."""
    for i, (start, code, end_step, *notice) in enumerate(incarnations):
        budget.close_open(record, start)
        assert not budget.decide_start(record, start, 3).give_up, (i, record)
        budget.begin(record, f"i{i}", start, started_at=100.0 * i)
        if code is not None:
            budget.end(record, f"i{i}", code, CRASH if code == 69 else "other", end_step, *notice)
    return record


def _fresh():
    return budget.for_config(None, budget.config_hash(TT))


def test_three_69s_without_a_new_checkpoint_give_up():
    record = _run(_fresh(), (None, 69, None), (None, 69, None), (None, 69, None))
    verdict = budget.decide_start(budget.close_open(record, None), None, 3)
    assert verdict.give_up and not verdict.earlier
    assert verdict.reason == f"gave up: 3 restarts without a new checkpoint; last error: {CRASH}"


def test_a_69_after_a_new_commit_does_not_spend_the_budget():
    record = _run(_fresh(), (None, 69, None), (None, 69, None), (None, 69, 4), (4, 69, 4), (4, 69, 4))
    assert len(budget.no_progress_streak(record["incarnations"], 4)) == 2
    assert not budget.decide_start(record, 4, 3).give_up


def test_progress_seen_only_at_the_next_start_counts_too():
    """A commit whose end was not recorded (node lost) shows up as the next start's step."""
    record = _run(_fresh(), (None, 69, None), (None, 69, None), (None, None, None))
    budget.close_open(record, 8)
    assert record["incarnations"][-1]["reason"] == budget.LOST
    assert budget.no_progress_streak(record["incarnations"], 8) == []


def test_lost_nodes_and_notices_neither_count_nor_reset():
    record = _run(_fresh(), (4, 69, 4), (4, None, None), (4, 75, 4), (4, 69, 4))
    budget.close_open(record, 4)
    assert [i["code"] for i in budget.no_progress_streak(record["incarnations"], 4)] == [69, 69]
    assert budget.decide_start(record, 4, 2).give_up
    assert not budget.decide_start(record, 4, 0).give_up  # 0: never give up


def test_recorded_78_short_circuits_the_same_config_only():
    record = _run(_fresh(), (None, 78, None))
    verdict = budget.decide_start(record, None, 3)
    assert verdict.give_up and verdict.earlier and verdict.reason == "other"
    changed = budget.for_config(record, budget.config_hash([*TT, "--training.steps", "9"]))
    assert not budget.decide_start(changed, None, 3).give_up and changed["incarnations"] == []


def test_config_hash_ignores_the_flags_the_wrapper_owns():
    owned = [*TT, "--checkpoint.folder", "/x", "--checkpoint.load_step=4", "--checkpoint.no-enable",
             "--checkpoint.keep-latest-k", "2"]  # fmt: skip
    assert budget.config_hash(owned) == budget.config_hash(TT)
    assert budget.config_hash([*TT, "--checkpoint.interval", "5"]) != budget.config_hash(TT)


def test_record_keeps_the_newest_incarnations():
    record = _fresh()
    for i in range(budget.KEEP + 5):
        budget.begin(record, f"i{i}", None)
        budget.end(record, f"i{i}", ExitCode.PREEMPTED_SAVED, "saved", i)
    assert len(record["incarnations"]) == budget.KEEP and record["incarnations"][-1]["id"] == f"i{budget.KEEP + 4}"


def test_preemptions_never_count_whatever_their_code():
    """A spot VM reclaimed during start-up, three times: each start got a notice and
    exited 69 (no step to save yet); the fourth start trains."""
    record = _run(_fresh(), *[(None, 69, None, "sigterm")] * 3, (None, 69, None, "gcp"))
    assert budget.no_progress_streak(record["incarnations"], None) == []
    assert not budget.decide_start(record, None, 3).give_up
    assert [(i["preempted"], i["cause"]) for i in record["incarnations"][:2]] == [
        (True, "preemption notice (sigterm)")] * 2
    # they neither count nor break the count: healthy failures around them still add up
    record = _run(_fresh(), (None, 69, None), (None, 69, None, "sigterm"), (None, 69, None), (None, None, None))
    budget.close_open(record, None)
    assert [i["id"] for i in budget.no_progress_streak(record["incarnations"], None)] == ["i2", "i0"]
    assert budget.decide_start(record, None, 2).give_up


def test_each_incarnation_says_whether_a_preemption_ended_it():
    record = _run(_fresh(), (None, 69, None), (None, 75, 3, "aws"), (3, 69, 3, "stop"), (3, None, None), (3, 0, 9))
    budget.close_open(record, 9)
    assert [(i["code"], i["preempted"], i["cause"]) for i in record["incarnations"]] == [
        (69, False, "failure on a healthy cluster"),
        (75, True, "preemption notice (aws)"),
        (69, False, "failure on a healthy cluster"),  # `supervise stop` is a request, not a preemption
        (None, True, "node lost: no exit recorded (VM reclaimed or killed)"),
        (0, False, "finished"),
    ]  # fmt: skip


def _ended_69(notice=None, trouble_at=130.0):
    """A record whose newest incarnation started at 100.0 and ended 69 on this node (node 0)."""
    record = _run(_fresh(), (None, 69, None))
    budget.begin(record, "i1", None, started_at=100.0)
    return budget.end(record, "i1", 69, CRASH, None, notice, trouble_at)


def _first(record):
    inc = record["incarnations"][-1]
    return inc["preempted"], inc["cause"]


def test_the_first_trouble_in_the_cluster_decides():
    """Node 0's own view, amended at its next start with each peer's first trouble (PeerMarks)."""
    stale = {"node": 2, "kind": "failure", "what": "old", "at": 99.0, "since": 60.0}  # an older incarnation's
    peer_notice = {"node": 1, "kind": "notice", "what": "sigterm", "at": 120.0, "since": 99.0}
    peer_crash = {"node": 1, "kind": "failure", "what": "torchrun failed (exit 1)", "at": 120.0, "since": 101.0}
    late_notice = {"node": 1, "kind": "notice", "what": "gcp", "at": 140.0, "since": 100.0}
    # survivor of a partial preemption: node 1 got the notice, then node 0's collectives failed
    assert _first(budget.first_cause(_ended_69(), [stale, peer_notice])) == (
        True, "peer node 1 got a preemption notice (sigterm)")
    # a crash on node 1, then SkyPilot stops the survivor with SIGTERM: counted
    assert _first(budget.first_cause(_ended_69("sigterm"), [stale])) == (True, "preemption notice (sigterm)")
    assert _first(budget.first_cause(_ended_69("sigterm"), [stale, peer_crash])) == (
        False, "peer node 1 failed first: torchrun failed (exit 1)")
    # this node's own trouble came first: its own view stands
    assert _first(budget.first_cause(_ended_69(), [stale, late_notice])) == (False, "failure on a healthy cluster")
    assert _first(budget.first_cause(_ended_69("sigterm"), [late_notice])) == (True, "preemption notice (sigterm)")
    # idempotent (a start that died before its own record may amend the same incarnation again)
    twice = budget.first_cause(budget.first_cause(_ended_69(), [peer_crash]), [peer_crash])
    assert _first(twice) == (False, "peer node 1 failed first: torchrun failed (exit 1)")
    assert _first(budget.first_cause(_ended_69(), [])) == (False, "failure on a healthy cluster")
    assert len(budget.no_progress_streak(budget.first_cause(_ended_69(), [peer_notice])["incarnations"], None)) == 1


def test_status_view_of_the_record():
    assert budget.streak_view(None, None) is None
    record = _run(_fresh(), (None, 69, None, "sigterm"), (None, 69, None), (None, 69, None))
    assert budget.streak_view(record, None) == {"streak": 2, "last_error": CRASH, "preemptions": 1, "gave_up": None}
    assert budget.streak_view(record, 5)["streak"] == 0  # a newer commit than any start: progress
