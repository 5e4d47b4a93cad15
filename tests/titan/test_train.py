"""Real TorchTitan 0.3.0 training on CPU under real torchrun: exact resume after
SIGKILL, save-and-commit on a notice, skip when the deadline is too short."""

import time

import pytest

from supervisor.contract.runtime import ENV_RESUME_STEP, NOTICE_FILE, write_json_atomic
from supervisor.store.catalog import Catalog
from supervisor.titan.results import load_tensors, read_losses, step_path, tensor_differences
from tests.fixtures_titan import INTERVAL, STEPS, checkpoint_args, start_trainer

pytestmark = pytest.mark.slow


def _plant_decoy(ckpt) -> None:
    """An unreadable `step-99` with a `.metadata`: TorchTitan's own guess for
    load_step -1, which crashes the run if anything tries to load it."""
    (ckpt / "step-99").mkdir(parents=True)
    (ckpt / "step-99" / ".metadata").write_bytes(b"not a DCP checkpoint")


def _assert_same_as_reference(ref, ckpt, dump, incarnation, from_step):
    final = load_tensors(step_path(str(ckpt), STEPS), model_only=False)
    assert tensor_differences(final, ref.final) == []  # model and optimizer, bit for bit
    resumed = read_losses(dump, incarnation=incarnation)
    assert sorted(resumed) == list(range(from_step + 1, STEPS + 1))
    assert resumed == {s: ref.losses[s] for s in resumed}  # the same loss, step for step


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path, titan_args, reference_run):
    ref = reference_run(1)
    assert sorted(ref.losses) == list(range(1, STEPS + 1))
    ckpt, dump = tmp_path / "ckpt", tmp_path / "dump"
    args = titan_args(dump, steps=STEPS, checkpoint_interval=INTERVAL)
    env = {"SUPERVISE_CHECKPOINTS": str(ckpt), "SUPERVISE_INCARNATION": "a"}

    run = start_trainer([*args, *checkpoint_args(ckpt)], tmp_path / "run", env=env)
    run.wait_step(INTERVAL + 2)
    run.kill()  # the whole process tree, like a VM that vanished
    latest = Catalog(str(ckpt)).latest()
    assert latest.step is not None and INTERVAL <= latest.step < STEPS, latest.describe()

    # SUPERVISE_RESUME_STEP alone (no --checkpoint.load_step) loads exactly that step
    _plant_decoy(ckpt)
    env.update({"SUPERVISE_INCARNATION": "b", ENV_RESUME_STEP: str(latest.step)})
    again = start_trainer([*args, *checkpoint_args(ckpt)], tmp_path / "run", env=env)
    assert again.wait() == 0, again.tail()
    assert again.outcome()["outcome"] == "finished" and again.outcome()["step"] == STEPS
    assert Catalog(str(ckpt)).latest().step == STEPS
    _assert_same_as_reference(ref, ckpt, dump, "b", latest.step)


def test_notice_file_saves_commits_and_resumes_exactly_with_two_ranks(tmp_path, titan_args, reference_run):
    from supervisor.ledger.journal import read_events

    ref = reference_run(2)
    ckpt, dump, run_dir = tmp_path / "ckpt", tmp_path / "dump", tmp_path / "run"
    ledger = f"{ckpt}/_ledger"
    args = titan_args(dump, steps=STEPS, checkpoint_interval=INTERVAL)
    env = {"SUPERVISE_CHECKPOINTS": str(ckpt), "SUPERVISE_LEDGER": ledger, "SUPERVISE_INCARNATION": "a"}

    run = start_trainer([*args, *checkpoint_args(ckpt)], run_dir, nproc=2, env=env)
    run.wait_step(INTERVAL + 1)
    write_json_atomic(run_dir / NOTICE_FILE, {"source": "file", "received_at": time.time(), "deadline": None})
    assert run.wait() == 0, run.tail()
    outcome = run.outcome()
    assert outcome["outcome"] == "preempted_saved", outcome
    saved = outcome["step"]
    assert INTERVAL < saved < STEPS
    assert Catalog(str(ckpt)).latest().step == saved  # committed: 0 steps lost
    assert set(run.heartbeat_steps()) == {0, 1}

    events, _ = read_events(ledger)
    kinds = {e.kind for e in events}
    assert {"first_step", "progress", "checkpoint_saved", "checkpoint_committed"} <= kinds
    assert saved in {e.fields["step"] for e in events if e.kind == "checkpoint_committed"}

    (run_dir / NOTICE_FILE).unlink()  # the node wrapper clears it on each start
    env["SUPERVISE_INCARNATION"] = "b"
    again = start_trainer([*args, *checkpoint_args(ckpt, load_step=saved)], run_dir, nproc=2, env=env)
    assert again.wait() == 0, again.tail()
    assert again.outcome()["outcome"] == "finished"
    _assert_same_as_reference(ref, ckpt, dump, "b", saved)


def test_notice_deadline_shorter_than_a_save_skips_it(tmp_path, titan_args):
    ckpt, run_dir, dump = tmp_path / "ckpt", tmp_path / "run", tmp_path / "dump"
    args = titan_args(dump, steps=STEPS, checkpoint_interval=INTERVAL)
    _plant_decoy(ckpt)  # a fresh start (catalog: no verified step) must not load TorchTitan's guess
    run = start_trainer([*args, *checkpoint_args(ckpt)], run_dir,
                        env={"SUPERVISE_CHECKPOINTS": str(ckpt), ENV_RESUME_STEP: "none"})
    run.wait_step(INTERVAL + 1)  # one save measured
    assert min(read_losses(dump)) == 1
    write_json_atomic(run_dir / NOTICE_FILE, {"source": "aws", "received_at": time.time(),
                                              "deadline": time.time() + 0.5})
    assert run.wait() == 0, run.tail()
    outcome = run.outcome()
    assert outcome["outcome"] == "preempted_unsaved", outcome
    assert outcome["step"] == INTERVAL and "skipping the save" in outcome["reason"]
    assert Catalog(str(ckpt)).latest().step == INTERVAL
    assert "skipping the save" in run.tail(400)
