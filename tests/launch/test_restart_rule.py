"""The local emulator restarts exactly when SkyPilot would.

Both sides start from the same rendered recipe: SkyPilot's side is the
StrategyExecutor that SkyPilot 0.14.1's own `StrategyExecutor.make` builds from
our rendered sky.Task (its `job_recovery`), called for real (no cloud is
contacted: the executor only needs a backend object to exist); the emulator's
side is the local backend's request for the same NodeTask, through `decide`.
"""

from __future__ import annotations

import asyncio

import pytest

from supervisor.contract.exitcodes import ExitCode
from supervisor.launch import dryrun
from supervisor.launch.local import RestartRule, decide, skypilot_exit_codes
from supervisor.recipes import RECIPES_DIR, build_spec

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
R, P, U = int(ExitCode.RETRYABLE), int(ExitCode.PREEMPTED_SAVED), int(ExitCode.USER_ERROR)

# One managed job each: the node exit codes of each incarnation that ended (2 nodes;
# None = still running when a peer failed, SkyPilot then force-cancels it: 137).
SEQUENCES = {
    "75s": [{0: P, 1: P}] * 6,
    "69 after progress": [{0: R, 1: None}, {0: 0, 1: R}, {0: P, 1: P}],
    "69 loop": [{0: R, 1: R}] * 8,
    "78": [{0: U, 1: None}],
    "78 after recoveries": [{0: P, 1: P}, {0: R, 1: R}, {0: U, 1: U}],
    "signal death": [{0: 139, 1: None}],  # SIGSEGV in the run script, cluster still up: 128+11
    "mixed nodes": [{0: R, 1: U}, {0: U, 1: 0}],
    "crash": [{0: 1, 1: 0}],
    "peer stuck after finish": [{0: 0, 1: None}],
}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("SUPERVISE_BUCKET", "s3://my-ckpts/supervise")
    monkeypatch.setenv("HF_TOKEN", "hf_x")


def skypilot_executor(recipe: str):
    """The executor SkyPilot's jobs controller makes for our rendered task: the API
    server first fills defaults (sky/jobs/server/core.py -> dag_utils.
    fill_default_config_in_dag_for_job_launch), the controller then calls make()."""
    from sky import backends, dag
    from sky.jobs.recovery_strategy import StrategyExecutor
    from sky.utils import dag_utils

    _, request = dryrun(build_spec(recipe, spot=True), backend="skypilot")
    graph = dag.Dag()
    graph.add(request.task)
    dag_utils.fill_default_config_in_dag_for_job_launch(graph)
    return StrategyExecutor.make(None, backends.CloudVmRayBackend(), graph.tasks[0], job_id=1, task_id=0, pool=None,
                                 starting=set(), starting_lock=asyncio.Lock(), starting_signal=asyncio.Condition())


def emulator_rule(recipe: str) -> RestartRule:
    _, job = dryrun(build_spec(recipe, spot=True), backend="local")
    return RestartRule(job.max_restarts_on_errors, job.recover_on_exit_codes)


def run(sequence, *, restart) -> list[str]:
    """Per incarnation: finish / recover / fail; stops at the first fail, like the job."""
    out = []
    for codes in sequence:
        action = "finish" if all(codes.get(r) == 0 for r in (0, 1)) else (
            "recover" if restart(codes) else "fail")
        out.append(action)
        if action != "recover":
            break
    return out


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_emulator_and_skypilot_agree(name):
    sky_exec = skypilot_executor("llama3_debug")
    rule = emulator_rule("llama3_debug")
    seq = SEQUENCES[name]
    sky_side = run(seq, restart=lambda c: sky_exec.should_restart_on_failure(exit_codes=skypilot_exit_codes(c, 2)))
    ours = run(seq, restart=lambda c: decide(c, num_nodes=2, rule=rule).action == "recover")
    assert ours == sky_side, name
    assert rule.restart_cnt_on_failure == sky_exec.restart_cnt_on_failure


def test_outcomes_are_the_safe_ones():
    """What the rendered rule means: 75/69 always recover (69 loops end in the
    wrapper, which exits 78), 78 and anything unlisted never restart."""
    outcomes = {name: run(seq, restart=lambda c, r=emulator_rule("llama3_8b"): decide(c, num_nodes=2, rule=r).action
                          == "recover") for name, seq in SEQUENCES.items()}
    assert outcomes["75s"] == ["recover"] * 6 and outcomes["69 loop"] == ["recover"] * 8
    assert outcomes["78"] == ["fail"] and outcomes["78 after recoveries"] == ["recover", "recover", "fail"]
    assert outcomes["signal death"] == ["fail"] and outcomes["crash"] == ["fail"]
    assert outcomes["mixed nodes"] == ["recover", "fail"], "SkyPilot: any listed code among the nodes recovers"


def test_a_lost_node_is_a_preemption_and_spends_nothing():
    """SkyPilot's controller recovers a cluster that is not UP without consulting
    the exit codes (sky/jobs/controller.py); the emulator's lost node is that."""
    rule = RestartRule(0, [P, R])
    for _ in range(5):
        assert decide({0: -9, 1: None}, num_nodes=2, rule=rule).action == "recover"
    assert rule.restart_cnt_on_failure == 0


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_renders_the_same_rule_for_both_backends(recipe):
    sky_exec = skypilot_executor(recipe)
    rule = emulator_rule(recipe)
    assert sky_exec.max_restarts_on_errors == rule.max_restarts_on_errors == 0
    assert sky_exec.recover_on_exit_codes == rule.recover_on_exit_codes == [P, R]
    assert U not in sky_exec.recover_on_exit_codes


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_no_progress_bound_goes_to_the_node_wrapper(recipe):
    """K = recovery.max_restarts_without_progress reaches `supervise node` on both backends."""
    spec = build_spec(recipe, sets=["recovery.max_restarts_without_progress=5"])
    _, job = dryrun(spec, backend="local")
    _, request = dryrun(spec, backend="skypilot")
    flag = ["supervise", "node", "--checkpoints", spec.checkpoints_url, "--max-restarts-without-progress", "5"]
    assert job.node_argv[:6] == flag
    assert " ".join(flag) in request.task.run
