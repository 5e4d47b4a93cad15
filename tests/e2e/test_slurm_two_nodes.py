"""Two nodes for real: `supervise start llama3_debug --num-nodes 2 --infra slurm` goes
through SkyPilot's `sky jobs launch` onto the local Slurm (tests/e2e/conftest.py: four
slurmd on one machine, node i on 127.0.0.i), with the task exactly as `start` renders
it by default: one CPU rank per node, torchrun's rendezvous at the first line of
SKYPILOT_NODE_IPS, gloo between the two nodes. One job, two interruptions in a row:

(a) a node lost without notice: node 2's Slurm node is taken out (`scontrol update
    State=DOWN`: the cloud reclaimed the VM) and every process of the job on it is
    SIGKILLed. SkyPilot sees the cluster not UP and recovers (a preemption: FAILOVER
    relaunches in place); both nodes resume from the newest committed step.
(c) `supervise stop`: both nodes save one final step, commit it, exit 0.

Not here: (b) a notice on node 2 only. Both nodes save the same step, commit it and
exit 75 (seen here, 2026-12-07), but SkyPilot's Slurm runner starts all nodes as one
`srun --kill-on-bad-exit` step (sky/backends/task_codegen.py, SlurmCodeGen): the first
node's 75 makes srun SIGTERM the other, srun reports one code for the step, 143, and
the job FAILED (143 is not in recover_on_exit_codes; max_restarts_on_errors 0). On a
cloud (Ray) get_or_fail reports every node's code, [75, 137], and 75 recovers. Until
the nodes' exit order allows for it (the peers exit first, the head last), a notice on
a multi-node Slurm job ends it: see docs/cloud.md.

Beside it, an uninterrupted 2-node run of the same recipe and length on two other
Slurm nodes (each job holds whole nodes). The interrupted job's checkpoint at a step
committed after the recovery is bit-identical to the reference's at that step: model
and optimizer, every tensor. Then `supervise report NAME --json`: 2 nodes, one
recovery, caused by a preemption without notice (the merged ledger: ledger.merged;
nobody wrote the loss down), phases that sum to the wall time.

It prints (and writes to $SUPERVISE_E2E_REPORT_2N, when set) what it measured: per
recovery detection, provisioning, setup per node, TorchTitan start-up, load and first
step; the stop; the test's own duration. No wall-clock time is asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import psutil
import pytest

from tests.e2e.conftest import infra_env
from tests.e2e.skyjobs import SUPERVISE, Job, _first_after, _run, _sky_events, _status

pytestmark = [
    pytest.mark.slow, pytest.mark.slurm, pytest.mark.timeout(3600),
    # Not in CI yet (issue 26 stays open): its one full pass (808 s) failed the bit-identical
    # check (unseeded weights, since seeded, not rerun), case (b) ends the job on Slurm (srun
    # --kill-on-bad-exit kills the peer of the first 75: exit 143, FAILED), and with the 1-node
    # test it would take CI past 45 minutes. By hand: SUPERVISE_E2E_TWO_NODES=1 pytest tests/e2e
    pytest.mark.skipif(not os.environ.get("SUPERVISE_E2E_TWO_NODES"),
                       reason="issue 26: not yet green on Slurm (see the comment at its pytestmark)"),
]

STEPS = 30  # both jobs: the same length, so the same learning-rate schedule
# the comparison step must survive in-run retention; both jobs start from the same weights
# (TorchTitan seeds its init only when told: as the drill does, supervisor/drill.py)
SAME_RUN = ("--set", "checkpoint.keep=0", "--set", "overrides.debug.seed=0",
            "--set", "overrides.debug.deterministic=true")


def _wait(what: str, check, timeout: float = 1200, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _ledger(job: Job):
    from supervisor.ledger.journal import read_events
    from supervisor.ledger.report import ledger_url_of

    return read_events(ledger_url_of(job.url))[0]


def _starts(events) -> list[dict[str, dict]]:
    """The job's starts, oldest first: {writer ("node0", "node1"): its node_start} each
    (every recovery restarts every node: the k-th start of each node is the job's k-th)."""
    out: list[dict[str, dict]] = []
    for e in events:
        if e.kind == "node_start":
            k = sum(e.writer in s for s in out)
            if k == len(out):
                out.append({})
            out[k][e.writer] = e
    return out


def _of(events, kind: str, start: dict) -> dict[str, object]:
    """writer -> the `kind` event of that writer's node in this start (trainer events: rank 0's)."""
    labels = {e.incarnation: w for w, e in start.items()}
    return {labels[e.incarnation]: e for e in events if e.kind == kind and e.incarnation in labels}


def _node_procs(name: str, rank: int) -> list[psutil.Process]:
    """Every process of job `name` on node `rank` (SkyPilot's env names both)."""
    out = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("SKYPILOT_NODE_RANK") == str(rank) and name in env.get("SKYPILOT_TASK_ID", ""):
            out.append(p)
    return out


def _wrapper(name: str, rank: int) -> psutil.Process:
    """Node `rank`'s `supervise node` process (not torchrun or a trainer under it)."""
    for p in _node_procs(name, rank):
        argv = p.cmdline()
        if any(a.endswith("/supervise") for a in argv[:2]) and "node" in argv[1:3]:
            return p
    raise AssertionError(f"no supervise node process for {name} rank {rank}")


def _slurm_node(env: dict[str, str], proc: psutil.Process) -> str:
    """The Slurm node a node process runs on: its rank's address in SKYPILOT_NODE_IPS -> NodeAddr."""
    penv = proc.environ()
    ip = penv["SKYPILOT_NODE_IPS"].split()[int(penv["SKYPILOT_NODE_RANK"])]
    rows = _run(["sinfo", "-h", "-N", "-o", "%N %o"], env, timeout=60).stdout.split("\n")
    return next(n for n, addr in (r.split() for r in rows if r.strip()) if addr == ip)


def _take_down(env: dict[str, str], node: str) -> None:
    """The cloud reclaims the node: Slurm fails the job on it (NODE_FAIL)."""
    out = _run(["scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=e2e: the VM was reclaimed"],
               env, timeout=60)
    assert out.returncode == 0, out.stderr


def test_two_nodes_lose_a_node_resume_stop_and_report(local_slurm, tmp_path, monkeypatch):
    from supervisor.store.catalog import Catalog
    from supervisor.store.local_server import LocalObjectStore
    from supervisor.titan.results import load_tensors, step_path, tensor_differences

    t_test = time.monotonic()
    user, sky_home = local_slurm["SUPERVISE_SLURM_USER"], local_slurm["SUPERVISE_SLURM_SKY_HOME"]
    assert int(local_slurm["SUPERVISE_SLURM_NODES"]) >= 4, "two 2-node jobs side by side need four Slurm nodes"
    with LocalObjectStore(tmp_path / "s3") as store:
        for key, value in store.env.items():
            monkeypatch.setenv(key, value)
        env = infra_env() | store.env | {"HOME": sky_home, "SLURM_CONF": local_slurm["SLURM_CONF"],
                                         "SUPERVISE_HOME": str(tmp_path / "supervise-home")}
        m: dict[str, object] = {"bring_up_s": local_slurm["bring_up_s"]}
        job = Job(env, store.bucket, "two", STEPS, SAME_RUN, num_nodes=2)
        # the same machine: torchrun's store of the other job needs its own port
        ref = Job(env, store.bucket, "ref2", STEPS, (*SAME_RUN, "--set", "envs.SUPERVISE_MASTER_PORT=8019"),
                  num_nodes=2)
        jobs = [job, ref]
        try:
            # -- (a) node 2 lost without notice, after a commit --------------------------------
            first = job.first_commit()
            m["launch_to_first_commit_s"] = round(time.time() - job.t_launch, 1)
            victim = _wrapper(job.name, 1)
            lost_node = _slurm_node(env, victim)
            ref_nodes = {_slurm_node(env, _wrapper(ref.name, r)) for r in (0, 1)} if _node_procs(ref.name, 0) else set()
            assert lost_node not in ref_nodes, (lost_node, ref_nodes)  # whole nodes: the reference keeps its own
            t_kill = time.time()
            _take_down(env, lost_node)
            killed = _node_procs(job.name, 1)
            for p in killed:
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
            committed_at_kill = Catalog(job.url).latest().step
            m.update(kill={"t": t_kill, "slurm_node": lost_node, "processes": len(killed),
                           "committed": committed_at_kill, "first_commit": first})
            _wait("RECOVERING after the node was lost",
                  lambda: _first_after(_sky_events(sky_home, job.job_id), "RECOVERING", t_kill - 1), every=3)
            # the node is back at once: its slurmd still answers, and ReturnToService=2 returns a
            # DOWN node that registers (the cloud has capacity again)
            second = _wait("both nodes' second start and first step",
                           lambda: (s := _starts(_ledger(job))) and len(s) >= 2 and len(s[1]) == 2
                           and _of(_ledger(job), "first_step", s[1]) and s[1], timeout=1500)
            resumed_a = {w: e.get("step") for w, e in _of(_ledger(job), "resume", second).items()}

            # -- (c) supervise stop, after a periodic commit of the second start ----------------
            resumed = max(resumed_a.values())
            compare = _wait("a periodic commit after the resume",
                            lambda: next((s for s in Catalog(job.url).steps() if s > resumed and s % 5 == 0
                                          and Catalog(job.url).inspect(s).state == "committed"), None), timeout=900)
            t_stop = time.time()
            stopped = _run([SUPERVISE, "stop", job.name], env, timeout=1200)
            m["stop_command_s"] = round(time.time() - t_stop, 1)
            assert stopped.returncode == 0, f"{stopped.stdout}\n{stopped.stderr}"
            stop_status, stop_states, _ = job.wait_terminal(user)
            ref_status, _, _ = ref.wait_terminal(user, timeout=2400)
        finally:
            for j in jobs:
                j.cleanup(tmp_path)
            shutil.copytree(os.path.join(sky_home, "sky_logs"), tmp_path / "sky_logs", dirs_exist_ok=True)

        events = _ledger(job)
        starts = _starts(events)
        report_out = _run([SUPERVISE, "report", job.name, "--json"], env, timeout=300)
        report = json.loads(report_out.stdout) if report_out.returncode == 0 else {"error": report_out.stderr}
        sky = _sky_events(sky_home, job.job_id)
        exits_c = _of(events, "exit", starts[-1])
        m.update({
            "test_s": round(time.monotonic() - t_test, 1),
            "skypilot_states": [s for s, _, _ in sky],
            "recovering_reasons": [r for s, _, r in sky if s == "RECOVERING"],
            "detection_s": round(_first_after(sky, "RECOVERING", t_kill - 1) - t_kill, 1),
            "resumed_after_kill": resumed_a,
            "exits_after_stop": {w: (e.get("code"), e.get("saved_step"), e.get("notice")) for w, e in exits_c.items()},
            "setup_s": [(e.get("node_rank"), round(float(e.get("duration_s")), 1), round(e.t - job.t_launch, 1))
                        for e in events if e.kind == "setup"],  # (node, seconds, when after the launch)
            "stop_states": stop_states, "compared_step": compare,
            "report": {k: report.get(k) for k in ("state", "nodes", "recoveries", "preemptions", "failures", "wall_s",
                                                  "productive_s", "checkpoint_s", "lost_s", "recovery_s", "queue_s",
                                                  "phases", "run", "problems")},
            "interruptions": report.get("interruptions"),
            "logs": str(tmp_path),
        })
        print("\nslurm 2-node e2e:", json.dumps(m, indent=1, default=str))
        if os.environ.get("SUPERVISE_E2E_REPORT_2N"):
            with open(os.environ["SUPERVISE_E2E_REPORT_2N"], "w") as f:
                f.write(json.dumps(m, indent=1, default=str) + "\n")

        # (a) SkyPilot recovered from the lost node; both nodes resumed from the newest commit
        assert "RECOVERING" in m["skypilot_states"], m["skypilot_states"]
        assert len(set(resumed_a.values())) == 1 and resumed_a["node0"] >= committed_at_kill, (resumed_a, m["kill"])
        # (c) the stop: one final step, saved by both nodes, committed; the job did not recover
        final = {s for _, s, _ in m["exits_after_stop"].values()}
        assert len(final) == 1 and None not in final, m["exits_after_stop"]
        assert {c for c, _, _ in m["exits_after_stop"].values()} == {0}
        assert {n for _, _, n in m["exits_after_stop"].values()} == {"stop"}
        (final_step,) = final
        assert Catalog(job.url).inspect(final_step).state == "committed"
        assert f"saved and committed step {final_step}" in stopped.stdout + stopped.stderr
        assert len(starts) == 2, starts
        assert stop_status["state"] in ("CANCELLED", "SUCCEEDED") and stop_status["recoveries"] == 1, stop_status
        # bit-identical to the uninterrupted run, model and optimizer, after the recovery
        assert ref_status["state"] == "SUCCEEDED", ref_status
        ours = load_tensors(step_path(job.url, compare), model_only=False)
        theirs = load_tensors(step_path(ref.url, compare), model_only=False)
        assert ours and tensor_differences(ours, theirs) == []
        # (d) the report: 2 nodes, the recovery and its cause, phases summing to the wall time
        assert report.get("nodes") == 2, report
        causes = [ep["cause"] for ep in report["interruptions"]]
        assert causes == ["no_notice"], report["interruptions"]
        assert report["recoveries"] == 1 and report["preemptions"] == {"notice": 0, "no_notice": 1}
        assert report["interruptions"][0]["resumed_step"] == resumed_a["node0"]
        parts = sum(report[k] for k in ("productive_s", "checkpoint_s", "lost_s", "recovery_s", "queue_s"))
        assert abs(parts - report["wall_s"]) < 1.0, report
