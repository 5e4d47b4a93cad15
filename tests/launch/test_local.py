"""Local backend: recovery policy and process handling, with a stand-in node
command (tests/launch/standin_node.py) so each test takes seconds. The real
node wrapper and trainer run in test_local_training.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil

from supervisor import registry
from supervisor.contract.exitcodes import ExitCode
from supervisor.launch.local import LocalJob, RestartRule, decide, node_options_for, read_state
from supervisor.launch.procs import tagged

STANDIN = str(Path(__file__).with_name("standin_node.py"))


def job(tmp_path, name, *args, **kw) -> LocalJob:
    return LocalJob(name=name, node_argv=[sys.executable, STANDIN, "node", "--", *args],
                    env={"STANDIN_DIR": str(tmp_path / "standin")}, **kw)


def starts(tmp_path, rank) -> list[dict]:
    path = tmp_path / "standin" / f"starts-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---- pure policy (the rule itself: test_restart_rule.py) ----

LISTED = [75, 69]


def test_decide_finish_only_when_every_node_finished():
    assert decide({0: 0, 1: 0}, num_nodes=2, rule=RestartRule(0, LISTED)).action == "finish"
    d = decide({0: 0, 1: None}, num_nodes=2, rule=RestartRule(1, LISTED))
    assert d.action == "recover" and "did not exit" in d.reason and "restart 1 of 1" in d.reason


def test_decide_user_error_fails_with_a_zero_budget_even_beside_a_lost_peer_codes():
    d = decide({0: 78, 1: None}, num_nodes=2, rule=RestartRule(0, LISTED))
    assert d.action == "fail" and "user/config error" in d.reason and "not retried" in d.reason


def test_decide_node_loss_is_a_preemption_whatever_the_budget():
    rule = RestartRule(0, LISTED)
    lost = decide({0: None, 1: -9}, num_nodes=2, rule=rule)
    assert lost.action == "recover" and "SIGKILL" in lost.reason and "preemption" in lost.reason
    assert rule.restart_cnt_on_failure == 0


def test_decide_listed_codes_recover_without_counting():
    rule = RestartRule(0, LISTED)
    for codes in ({0: 75, 1: 75}, {0: 69, 1: None}, {0: 78, 1: 69}):
        d = decide(codes, num_nodes=2, rule=rule)
        assert d.action == "recover" and "recover_on_exit_codes" in d.reason
    assert rule.restart_cnt_on_failure == 0


def test_decide_other_codes_spend_the_budget():
    rule = RestartRule(1, [75])
    assert decide({0: 1, 1: 0}, num_nodes=2, rule=rule).action == "recover"
    d = decide({0: 1, 1: 0}, num_nodes=2, rule=rule)
    assert d.action == "fail" and "node 0 exited 1" in d.reason and "max_restarts_on_errors=1" in d.reason


# ---- real processes ----


def test_user_error_is_not_retried(launcher, tmp_path):
    launcher.schedule(job(tmp_path, "usererr", "--exit", str(int(ExitCode.USER_ERROR)), recover_on_exit_codes=[75, 69]))
    st = launcher.wait("usererr", timeout_s=60)
    assert st.state == "FAILED" and st.recoveries == 0
    assert "user/config error" in st.reason and "not retried" in st.reason
    assert len(starts(tmp_path, 0)) == 1
    assert registry.lookup("usererr")["backend"] == "local"


def test_unlisted_code_is_retried_up_to_the_limit_then_failed(launcher, tmp_path):
    launcher.schedule(job(tmp_path, "flaky", "--exit", "69", num_nodes=2, max_restarts_on_errors=2))
    st = launcher.wait("flaky", timeout_s=90)
    assert st.state == "FAILED" and st.recoveries == 2
    assert "exited 69" in st.reason and "max_restarts_on_errors=2" in st.reason
    for rank in (0, 1):
        assert [s["SUPERVISE_INCARNATION"] for s in starts(tmp_path, rank)] == ["0", "1", "2"]


def test_node_argv_gets_local_options():
    argv = ["supervise", "node", "--checkpoints", "s3://b/r", "--", "--module", "llama3"]
    assert node_options_for(argv, master_port=1234, notice_file=Path("/r/n.json")).to_argv() == [
        "supervise", "node", "--checkpoints", "s3://b/r", "--max-restarts-without-progress", "3",
        "--master-port", "1234", "--notice-file", "/r/n.json", "--", "--module", "llama3"]


def test_preemptions_restart_all_nodes_with_skypilot_env(launcher, tmp_path):
    j = job(tmp_path, "twonodes", "--steps", "16", num_nodes=2, gpus_per_node=1, max_restarts_on_errors=0,
            chaos=[{"kind": "notice", "at_step": 3, "node": 0, "deadline_s": 30.0},
                   {"kind": "kill", "at_step": 8, "node": 1}])
    launcher.schedule(j)
    st = launcher.wait("twonodes", timeout_s=90)
    assert st.state == "SUCCEEDED" and st.recoveries == 2, "preemptions do not spend the error budget"
    s0, s1 = starts(tmp_path, 0), starts(tmp_path, 1)
    assert len(s0) == len(s1) == 3, "every node restarted after each preemption"
    assert len({s["pid"] for s in s0 + s1}) == 6
    for rank, runs in ((0, s0), (1, s1)):
        for inc, env in enumerate(runs):
            assert env["SKYPILOT_NUM_NODES"] == "2" and env["SKYPILOT_NODE_RANK"] == str(rank)
            assert env["SKYPILOT_NODE_IPS"] == "127.0.0.1\n127.0.0.1"
            assert env["SKYPILOT_NUM_GPUS_PER_NODE"] == "1"
            assert env["SUPERVISE_INCARNATION"] == str(inc)
    assert [a["port"] for a in s0] == [b["port"] for b in s1], "one rendezvous per incarnation"
    assert s0[0]["SKYPILOT_TASK_ID"] == s0[1]["SKYPILOT_TASK_ID"]
    # the killed node's worker (own session) died with it, not left as an orphan
    worker_pids = [int((tmp_path / "standin" / f"worker-{r}.pid").read_text()) for r in (0, 1)]
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in worker_pids)
    state = read_state("twonodes")
    assert [c["kind"] for c in state["chaos_fired"]] == ["notice", "kill"]
    assert state["errors"] == 0 and "lost (SIGKILL)" in state["last_recovery_reason"]
    log = (tmp_path / "home" / "local" / "twonodes" / "job.log").read_text()
    assert "exited 75 (preempted, state saved)" in log


def test_stop_without_a_bucket_cancels_and_leaves_no_process(launcher, tmp_path, capsys):
    launcher.schedule(job(tmp_path, "stopme", "--steps", "1000", num_nodes=2))
    import time

    deadline = time.monotonic() + 30
    while (read_state("stopme") or {}).get("state") != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # no checkpoint bucket: no stop request to send, so cancelled at once without a save (as on SkyPilot)
    result = launcher.cancel("stopme")
    assert not result.saved and "no checkpoint bucket" in result.reason
    st = launcher.status("stopme")[0]
    assert st.state == "CANCELLED" and st.reason == "stopped by the user"
    assert not tagged("stopme/")
    launcher.logs("stopme")
    out = capsys.readouterr().out
    assert "(node-0) === incarnation 0" in out


def test_stall_stops_a_worker_and_teardown_still_kills_it(launcher, tmp_path):
    launcher.schedule(job(tmp_path, "stall", "--steps", "12", num_nodes=2,
                            chaos=[{"kind": "stall", "at_step": 3, "node": 1}]))
    st = launcher.wait("stall", timeout_s=60)
    assert st.state == "SUCCEEDED"
    fired = read_state("stall")["chaos_fired"]
    assert [(c["kind"], c["detail"]) for c in fired] == [("stall", "SIGSTOPped rank 1")]
    assert not tagged("stall/"), "a SIGSTOPped worker is still killed at teardown"


def test_gpus_per_node_is_what_skypilot_sets(tmp_path):
    """SKYPILOT_NUM_GPUS_PER_NODE: the accelerator count, 0 for a CPU task (sky/backends/
    task_codegen.py, RayCodeGen._add_ray_task); a CPU job's ranks go as --nproc-per-node."""
    from supervisor.launch import dryrun
    from supervisor.launch.local import node_env
    from supervisor.recipes import build_spec

    def env(*sets):
        _, j = dryrun(build_spec("llama3_debug", sets=["checkpoint.bucket=s3://bucket/r", *sets]), backend="local")
        return j, node_env(j, rank=0, incarnation=0, run_dir=tmp_path, task_id="t")["SKYPILOT_NUM_GPUS_PER_NODE"]

    cpu, gpus = env("resources.procs_per_node=2")
    assert gpus == "0" and cpu.node_argv[cpu.node_argv.index("--nproc-per-node") + 1] == "2"
    gpu, gpus = env("resources.accelerators=H100:8")
    assert gpus == "8" and "--nproc-per-node" not in gpu.node_argv


def test_status_shows_the_restart_streak_from_the_record(tmp_path):
    from supervisor.launch.cli import _bucket_view, _streak
    from supervisor.node import budget
    from supervisor.store.fs import Store

    record = budget.for_config(None, "c")
    for i, notice in enumerate(["sigterm", None, None]):
        budget.end(budget.begin(record, f"i{i}", None), f"i{i}", 69, f"crash {i}", None, notice)
    budget.RestartRecord(Store(str(tmp_path))).save(record)
    view = _bucket_view(str(tmp_path))["restarts"]
    assert view == {"streak": 2, "last_error": "crash 2", "preemptions": 1, "gave_up": None}
    assert _streak(view) == "2 (1 preempted)" and _streak(None) == "-"
