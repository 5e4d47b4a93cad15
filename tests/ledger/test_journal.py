"""The journal keeps every event that emit() returned for: several writers and
incarnations, a SIGKILLed writer, a store that is down, corrupt lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from supervisor.ledger.journal import Journal, read_events


def _write_run(url: str) -> None:
    """Two incarnations, two nodes each, interleaved in time."""
    for inc in ("i0", "i1"):
        nodes = [Journal(url, writer=f"node{r}-rank0", incarnation=inc) for r in range(2)]
        for step in range(1, 4):
            for rank, j in enumerate(nodes):
                j.emit("progress", step=step, loss=1.0 / step, node=rank)


def _check_run(url: str) -> None:
    events, problems = read_events(url)
    assert problems == []
    assert len(events) == 12
    assert [e.t for e in events] == sorted(e.t for e in events)
    for inc in ("i0", "i1"):
        for rank in range(2):
            mine = [e for e in events if e.incarnation == inc and e.writer == f"node{rank}-rank0"]
            assert [e.get("step") for e in mine] == [1, 2, 3]
    first = events[0]
    assert first.kind == "progress" and first.time.endswith("+00:00") and first.mono is not None


def test_several_writers_and_incarnations_local(tmp_path):
    url = str(tmp_path / "ckpt" / "_ledger")
    _write_run(url)
    _check_run(url)
    _check_run("file://" + url)


@pytest.mark.slow
def test_several_writers_and_incarnations_s3(s3_url):
    url = s3_url + "/_ledger"
    _write_run(url)
    _check_run(url)


def test_same_writer_name_twice_keeps_both(tmp_path):
    url = str(tmp_path / "_ledger")
    a, b = Journal(url, "node0", "i0"), Journal(url, "node0", "i0")
    a.emit("node_start")
    b.emit("trainer_start")
    kinds = sorted(e.kind for e in read_events(url)[0])
    assert kinds == ["node_start", "trainer_start"]


def test_segments_roll_over(tmp_path, monkeypatch):
    from supervisor.ledger import journal

    monkeypatch.setattr(journal, "SEGMENT_EVENTS", 3)
    url = str(tmp_path / "_ledger")
    j = Journal(url, "w", "i0")
    for step in range(7):
        j.emit("progress", step=step)
    files = sorted(p.name for p in (tmp_path / "_ledger" / "i0").iterdir())
    assert len(files) == 3
    assert [e.get("step") for e in read_events(url)[0]] == list(range(7))


def test_missing_ledger_is_a_problem_not_an_error(tmp_path):
    events, problems = read_events(str(tmp_path / "nothing" / "_ledger"))
    assert events == [] and "no journal" in problems[0]


def test_corrupt_lines_are_skipped_and_reported(tmp_path):
    url = str(tmp_path / "_ledger")
    j = Journal(url, "w", "i0")
    j.emit("first_step", step=1)
    j.emit("progress", step=2)
    path = next((tmp_path / "_ledger" / "i0").iterdir())
    good = path.read_text()
    path.write_text(good + "{not json\n" + '{"kind":"progress","t":1,"fields":{"step":"x"}}\n' + good[:40])
    events, problems = read_events(url)
    assert [e.kind for e in events] == ["first_step", "progress"]
    assert len(problems) == 3 and all(path.name in p for p in problems)


def test_store_down_keeps_events_and_retries(tmp_path, caplog):
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the ledger folder should be")
    url = str(blocker / "_ledger")
    j = Journal(url, "w", "i0")
    j.emit("node_start")  # must not raise
    j.emit("progress", step=1)
    assert j.pending == 2 and "could not store" in caplog.text
    blocker.unlink()
    j.emit("progress", step=2)
    assert j.pending == 0
    assert [e.kind for e in read_events(url)[0]] == ["node_start", "progress", "progress"]


_CHILD = textwrap.dedent(
    """
    import sys
    from supervisor.ledger.journal import Journal
    j = Journal(sys.argv[1], writer="node0", incarnation="i0")
    step = 0
    while True:
        step += 1
        j.emit("progress", step=step)
        print(step, flush=True)
    """
)


@pytest.mark.parametrize("store", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_sigkill_after_emit_loses_nothing(store, tmp_path, request):
    url = (str(tmp_path / "_ledger") if store == "local" else request.getfixturevalue("s3_url") + "/_ledger")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, url], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    acknowledged = 0
    try:
        for line in proc.stdout:
            acknowledged = int(line)
            if acknowledged >= 20:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    steps = [e.get("step") for e in read_events(url)[0]]
    assert steps[:acknowledged] == list(range(1, acknowledged + 1))


@pytest.mark.slow
def test_unreachable_s3_does_not_raise(s3_url, monkeypatch, caplog):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    j = Journal(s3_url + "/_ledger", "w", "i0")
    j.emit("node_start")
    j.emit("progress", step=1)
    assert j.pending == 2 and "could not store" in caplog.text


def test_background_journal_never_waits_for_a_frozen_store(tmp_path, monkeypatch):
    """The trainer's journal: emit() returns while the store is stuck (a write that does not
    come back stands in for a frozen S3 endpoint); close() writes everything once it is back."""
    import threading

    from supervisor.ledger import journal as journal_mod

    release, entered = threading.Event(), threading.Event()
    real_put = journal_mod._put

    def frozen_put(store, path, data, budget_s):
        entered.set()
        release.wait(60)  # the watchdog below: never hang the suite
        return real_put(store, path, data, budget_s)

    monkeypatch.setattr(journal_mod, "_put", frozen_put)
    j = journal_mod.Journal(str(tmp_path / "_ledger"), writer="node0-rank0", incarnation="i1", background=True)
    j.emit("first_step", step=1)
    assert entered.wait(30)  # the writer thread is inside the frozen write
    for step in range(2, 6):
        j.emit("progress", step=step)  # returns although the store has not answered
    assert not release.is_set() and j.pending == 5
    release.set()
    assert j.close(timeout=30)
    events, problems = read_events(str(tmp_path / "_ledger"))
    assert [e.get("step") for e in events] == [1, 2, 3, 4, 5] and problems == []
