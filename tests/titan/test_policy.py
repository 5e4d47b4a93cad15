"""Pure logic of the trainer hooks: notice plan, save-time estimate, throttle, RNG state."""

import random

import pytest

from supervisor import spec
from supervisor.titan.policy import (
    DEFAULT_COMMIT_WAIT_S,
    EXIT_SLACK_S,
    SAVE_MARGIN,
    SaveTimer,
    save_kind,
    Throttle,
    commit_wait_s,
    notice_plan,
    resume_load_step,
)


def test_save_timer_is_a_moving_average():
    t = SaveTimer(window=3)
    assert t.expected() is None
    for s in (1.0, 2.0, 3.0, 10.0):
        t.add(s)
    assert t.expected() == 5.0  # last three


def test_save_timer_predicts_each_kind_of_save_from_its_own_measurements():
    t = SaveTimer()
    sync_direct, async_mount = save_kind(True, False), save_kind(False, True)
    assert (sync_direct, async_mount) == ("sync/direct", "async/mount")
    t.add(2.0, sync_direct)
    t.add(40.0, async_mount)  # through a mount a save waits for its upload too
    assert t.expected(sync_direct) == 2.0 and t.expected(async_mount) == 40.0
    assert t.expected(save_kind(False, False)) == 21.0  # none of its kind yet: every measured save
    assert t.expected() == 21.0


def test_notice_plan_sized_by_the_measured_save_not_a_reread_commit():
    # 8B through a mount: a save and its upload measured at 45 s fit AWS's two minutes
    assert notice_plan(0.0, 120.0, 45.0).save
    assert not notice_plan(0.0, 30.0, 45.0).save  # GCP's 30 s: the last committed step stands


def test_notice_without_deadline_saves():
    assert notice_plan(100.0, None, 50.0).save


def test_notice_before_any_measured_save_tries_to_save():
    assert notice_plan(100.0, 101.0, None).save


def test_notice_with_enough_time_saves():
    need = SAVE_MARGIN * 2.0 + EXIT_SLACK_S
    assert notice_plan(100.0, 100.0 + need + 0.1, 2.0).save


def test_notice_too_short_for_the_save_skips_it_and_says_why():
    plan = notice_plan(100.0, 102.0, 2.0)
    assert not plan.save
    assert "skipping the save" in plan.reason and "2.0 s to the deadline" in plan.reason


def test_throttle_by_time_or_steps():
    th = Throttle(every_s=10.0, every_steps=5)
    assert th.due(0.0, 1)
    assert not th.due(1.0, 2)
    assert th.due(11.0, 3)  # time
    assert th.due(12.0, 8)  # steps


def test_rng_state_round_trips_per_rank():
    import numpy as np
    import torch

    from supervisor.titan.rng import RngState

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    saved = RngState(rank=3).state_dict()
    assert list(saved) == ["rank_3"]
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    RngState(rank=3).load_state_dict(saved)
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_tensor_differences_is_bitwise():
    import torch

    from supervisor.titan.results import tensor_differences

    a = {"w": torch.tensor([1.0, 2.0]), "z": torch.tensor([0.0])}
    b = {"w": torch.tensor([1.0, 2.0]), "z": torch.tensor([-0.0])}  # equal as numbers, not as bits
    assert tensor_differences(a, b) == ["z"]
    assert tensor_differences(a, {"w": a["w"]}) == ["z"]


def test_commit_waits_only_through_a_mount_and_for_the_wrappers_time():
    assert commit_wait_s("5", same_place=True) == 0.0
    assert commit_wait_s(None, same_place=False) == DEFAULT_COMMIT_WAIT_S == spec.Checkpoint.model_fields["commit_wait_s"].default
    assert commit_wait_s("7.5", same_place=False) == 7.5


def test_resume_step_from_the_wrapper_overrides_torchtitans_guess():
    assert resume_load_step("none", -1) is None  # fresh: no step folder is loaded
    assert resume_load_step("12", -1) == 12
    assert resume_load_step("12", 12) == 12
    assert resume_load_step(None, -1) == -1  # plain torchrun: TorchTitan's own choice
    assert resume_load_step("", 7) == 7
    for bad in ("-1", "latest"):
        with pytest.raises(ValueError):
            resume_load_step(bad, -1)


def test_early_notice_saves_a_step_not_on_storage_yet():
    from supervisor.titan.policy import early_save_plan

    assert early_save_plan(7, 4, 0).save
    assert not early_save_plan(8, 8, 0).save  # the periodic save of this step
    assert not early_save_plan(4, None, 4).save  # the step just loaded
    assert not early_save_plan(0, None, 0).save  # nothing trained yet
