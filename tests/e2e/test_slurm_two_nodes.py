"""Two nodes for real: `supervise start llama3_debug --num-nodes 2 --infra slurm` goes
through SkyPilot's `sky jobs launch` onto the local Slurm (tests/e2e/conftest.py: two
slurmd on one machine, node i on 127.0.0.i), with the task exactly as `start` renders
it by default: setup makes a Python 3.11 venv with uv and installs the supervise wheel
that `start` shipped with the job (torch from the machine's local CPU wheel), the
tokenizer comes with the node's real `hf download` from a stand-in hub on loopback
(tests/fakehub.py: this machine cannot reach huggingface.co), one CPU rank per node,
torchrun's rendezvous at the first line of SKYPILOT_NODE_IPS, gloo between the nodes.
One job, three interruptions in a row:

(a) a node lost without notice: node 2's Slurm node is taken out (`scontrol update
    State=DOWN`: the cloud reclaimed the VM) and every process of the job on it is
    SIGKILLed. SkyPilot sees the cluster not UP and recovers (a preemption); both
    nodes resume from the newest committed step. The allocation is new; the test makes
    its nodes fresh VMs by deleting what setup made in the cluster's HOME once the old
    allocation's processes are gone (SkyPilot's batch script removes
    `.sky_clusters/<cluster>` in its exit trap, sky/provision/slurm/instance.py, but only
    when Slurm lets the trap finish: it did in one run here and not in the next), so
    one node's setup restores the environment from the bucket's snapshot (issue 25).
(b) a notice on node 2 only (SIGTERM to its `supervise node`, as Slurm's preemption
    sends): both nodes save the same step and commit it; node 2 exits 0 and node 1
    exits 75 last (supervisor.contract.exitcodes.process_exit: srun reports one code
    for all nodes), SkyPilot recovers in place (FAILOVER: the same allocation, the venv
    kept: setup reuses it) and both nodes resume from exactly that step (0 steps lost).
(c) `supervise stop`: both nodes save one final step, commit it, exit 0; it deep-verifies.

Beside it, an uninterrupted 2-node run of the same recipe, length, seed, data and
tokenizer files on the local backend (two nodes of one gloo rank on this machine, this
venv: the Slurm nodes' setup installs the same torch wheel from this machine's
find-links; a second SkyPilot job would cost CI another full install and start-up on
the same 2 cores). The interrupted job's checkpoint at a step committed after both
recoveries is bit-identical to the reference's at that step: model and optimizer,
every tensor. Then `supervise report NAME --json`: 2 nodes, two recoveries caused by a
preemption without notice and one with notice (the merged ledger, ledger.merged),
phases that sum to the wall time, starting and ending at SkyPilot's own timestamps.

It prints (and writes to $SUPERVISE_E2E_REPORT, when set) what it measured: per
recovery detection, provisioning, setup per node (reused / restored / installed),
TorchTitan start-up, load and first step; the stop; the test's own duration. No
wall-clock time is asserted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from supervisor.contract.jobstate import is_terminal
from tests.e2e.conftest import infra_env
from tests.e2e.skyjobs import SUPERVISE, Job, _first_after, _run, _sky_end_at, _sky_events, _status

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.timeout(3600)]

STEPS = 40  # both jobs: the same length, so the same learning-rate schedule; the recipe commits every 5
HUB_REPO = "supervise-e2e/tiny-tokenizer"  # served by the stand-in hub
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


def _setup_made(proc: psutil.Process) -> list[Path]:
    """What setup made for a node process's job (supervisor.launch.setup): the venv and the
    snapshot tools in its HOME (SkyPilot's per-cluster HOME), the assets in its working directory."""
    home = Path(proc.environ()["HOME"])
    return [home / ".supervise" / "venv", home / ".supervise" / "envsnap-tools",
            Path(proc.cwd()) / "supervise-assets"]


def _take_down(env: dict[str, str], node: str) -> None:
    """The cloud reclaims the node: Slurm fails the job on it (NODE_FAIL)."""
    out = _run(["scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=e2e: the VM was reclaimed"],
               env, timeout=60)
    assert out.returncode == 0, out.stderr


def _setups(events, starts: list[dict]) -> list[list]:
    """Each start's setup marks (the setup script's, written before its node starts; its own
    incarnation label): a setup belongs to the first start whose nodes all started after it."""
    out: list[list] = [[] for _ in starts]
    for e in (e for e in events if e.kind == "setup"):
        k = next((k for k, s in enumerate(starts) if min(n.t for n in s.values()) > e.t), None)
        if k is not None:
            out[k].append(e)
    return out


def _phases(events, start: dict, t_loss: float) -> dict:
    """A recovery's TorchTitan start-up, load and first step (seconds; the trainer's events are
    the job's rank 0's: node 0's). Setup is in _setups: Slurm's setup has no node rank."""
    node_start = start["node0"]
    ready = _of(events, "trainer_ready", start).get("node0")
    loaded = _of(events, "checkpoint_loaded", start).get("node0")
    first = _of(events, "first_step", start).get("node0")
    return {"titan_startup_s": round(ready.t - node_start.t, 1) if ready else None,
            "load_s": round(loaded.t - ready.t, 1) if loaded and ready else None,
            "first_step_s": round(first.t - loaded.t, 1) if first and loaded else None,
            "node_start_to_first_step_s": round(first.t - node_start.t, 1) if first else None,
            "loss_to_first_step_s": round(first.t - t_loss, 1) if first else None}


class _LocalReference:
    """The uninterrupted reference: `supervise start --backend local`, 2 nodes on this machine."""

    def __init__(self, env: dict[str, str], bucket: str, steps: int, extra: tuple[str, ...]):
        self.env = {**env, "HOME": os.environ.get("HOME", "/root")}  # this machine's user, not the Slurm one's
        self.name = f"e2e-ref2-{uuid.uuid4().hex[:6]}"
        self.url = f"s3://{bucket}/e2e/{self.name}"
        start = _run([SUPERVISE, "start", "llama3_debug", "--backend", "local", "--num-nodes", "2", "--name", self.name,
                      "--set", f"checkpoint.bucket=s3://{bucket}/e2e", "--set", f"overrides.training.steps={steps}",
                      *extra, "--yes"], self.env)
        assert start.returncode == 0, f"supervise start --backend local failed:\n{start.stdout}\n{start.stderr}"
        self.status: dict = {}

    def wait_terminal(self, timeout: float = 1800) -> dict:
        self.status = _wait(f"the reference {self.name} to end",
                            lambda: (st := _status(self.env, self.name)) and is_terminal(st.get("state")) and st,
                            timeout=timeout, every=5)
        return self.status

    def cleanup(self, keep: Path) -> None:
        if not is_terminal(self.status.get("state")):
            _run([SUPERVISE, "stop", "--now", self.name], self.env, timeout=300)
        logs = _run([SUPERVISE, "logs", self.name], self.env, timeout=300)
        (keep / f"{self.name}.log").write_text(logs.stdout + logs.stderr)


def _notice_on(name: str, rank: int) -> float:
    """Node `rank` gets a preemption notice: SIGTERM to its `supervise node`, as Slurm sends."""
    _wrapper(name, rank).send_signal(signal.SIGTERM)
    return time.time()


def test_two_nodes_lose_a_node_then_a_notice_on_one_node_then_stop_and_report(local_slurm, tmp_path, monkeypatch):
    from supervisor.store.catalog import Catalog
    from supervisor.store.local_server import LocalObjectStore
    from supervisor.titan.results import load_tensors, step_path, tensor_differences
    from supervisor.titan.tinydata import build_assets
    from tests.fakehub import FakeHub

    t_test = time.monotonic()
    user, sky_home = local_slurm["SUPERVISE_SLURM_USER"], local_slurm["SUPERVISE_SLURM_SKY_HOME"]
    # the tokenizer comes from the stand-in hub, the corpus from a folder the node user can read
    shared = Path(local_slurm["SUPERVISE_SLURM_DIR"]) / f"hub-{uuid.uuid4().hex[:6]}"
    assets = build_assets(shared)
    subprocess.run(["chmod", "-R", "a+rX", str(shared)], check=True)
    with LocalObjectStore(tmp_path / "s3") as store, FakeHub(HUB_REPO, assets.hf_assets_path) as hub:
        for key, value in store.env.items():
            monkeypatch.setenv(key, value)
        env = infra_env() | store.env | {"HOME": sky_home, "SLURM_CONF": local_slurm["SLURM_CONF"],
                                         "SUPERVISE_HOME": str(tmp_path / "supervise-home")}
        same_data = (*SAME_RUN, "--set", "tokenizer.tiny=false", "--set", f"tokenizer.hf_repo={HUB_REPO}",
                     "--set", f"dataset.path={assets.dataset_path}", "--set", f"envs.HF_ENDPOINT={hub.endpoint}")
        m: dict[str, object] = {"bring_up_s": local_slurm["bring_up_s"]}
        job = Job(env, store.bucket, "two", STEPS, same_data, num_nodes=2)
        ref = _LocalReference(env, store.bucket, STEPS, (*SAME_RUN, "--set", "tokenizer.tiny=false",
                                                         "--set", f"tokenizer.path={assets.hf_assets_path}",
                                                         "--set", f"dataset.path={assets.dataset_path}"))
        try:
            # -- (a) node 2 lost without notice, after a commit --------------------------------
            first = job.first_commit()
            m["launch_to_first_commit_s"] = round(time.time() - job.t_launch, 1)
            victim = _wrapper(job.name, 1)
            lost_node = _slurm_node(env, victim)
            head = _wrapper(job.name, 0)
            made = _setup_made(victim)
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
            # the new allocation's nodes are fresh VMs: nothing setup made is left (once the old
            # head is gone: it may still import from the venv; the new setup starts only after
            # SkyPilot ended the old allocation and provisioned the new one)
            _wait("the old allocation's head to end", lambda: not head.is_running(), timeout=600)
            for folder in made:
                shutil.rmtree(folder, ignore_errors=True)
            m["kill"]["deleted"] = [str(f) for f in made]
            # the node is back at once: its slurmd still answers, and ReturnToService=2 returns a
            # DOWN node that registers (the cloud has capacity again)
            second = _wait("both nodes' second start and first step",
                           lambda: (s := _starts(_ledger(job))) and len(s) >= 2 and len(s[1]) == 2
                           and _of(_ledger(job), "first_step", s[1]) and s[1], timeout=1500)
            resumed_a = {w: e.get("step") for w, e in _of(_ledger(job), "resume", second).items()}

            # -- (b) a notice on node 2 only, after a periodic commit of the second start -------
            after_a = _wait("a periodic commit after the first resume",
                            lambda: next((s for s in Catalog(job.url).steps() if s > max(resumed_a.values())
                                          and Catalog(job.url).inspect(s).state == "committed"), None), timeout=900)
            t_notice = _notice_on(job.name, 1)
            third = _wait("both nodes' third start and first step",
                          lambda: (s := _starts(_ledger(job))) and len(s) >= 3 and len(s[2]) == 2
                          and _of(_ledger(job), "first_step", s[2]) and s[2], timeout=1500)
            events = _ledger(job)
            exits_b = {w: (e.get("code"), e.get("saved_step"), e.get("notice"))
                       for w, e in _of(events, "exit", second).items()}
            resumed_b = {w: e.get("step") for w, e in _of(events, "resume", third).items()}

            # -- (c) supervise stop, after a periodic commit of the third start -----------------
            compare = _wait("a periodic commit after the second resume",
                            lambda: next((s for s in Catalog(job.url).steps() if s > max(resumed_b.values())
                                          and s % 5 == 0 and Catalog(job.url).inspect(s).state == "committed"),
                                         None), timeout=900)
            t_stop = time.time()
            stopped = _run([SUPERVISE, "stop", job.name], env, timeout=1200)
            m["stop_command_s"] = round(time.time() - t_stop, 1)
            assert stopped.returncode == 0, f"{stopped.stdout}\n{stopped.stderr}"
            stop_status, stop_states, _ = job.wait_terminal(user)
            ref_status = ref.wait_terminal()
        finally:
            job.cleanup(tmp_path)
            ref.cleanup(tmp_path)
            # down.sh removes SkyPilot's logs; keep them (controller, provision, job) for a post-mortem
            shutil.copytree(os.path.join(sky_home, "sky_logs"), tmp_path / "sky_logs", dirs_exist_ok=True)

        events = _ledger(job)
        starts = _starts(events)
        report_out = _run([SUPERVISE, "report", job.name, "--json"], env, timeout=300)
        report = json.loads(report_out.stdout) if report_out.returncode == 0 else {"error": report_out.stderr}
        sky = _sky_events(sky_home, job.job_id)
        exits_c = _of(events, "exit", starts[-1])
        setups = _setups(events, starts)
        hows = [sorted(e.get("how") for e in ss) for ss in setups]
        m.update({
            "test_s": round(time.monotonic() - t_test, 1),
            "skypilot_states": [s for s, _, _ in sky],
            "recovering_reasons": [r for s, _, r in sky if s == "RECOVERING"],
            "detection_a_s": round(_first_after(sky, "RECOVERING", t_kill - 1) - t_kill, 1),
            "detection_b_s": round(_first_after(sky, "RECOVERING", t_notice - 1) - t_notice, 1),
            "resumed_after_kill": resumed_a,
            "exits_after_notice": exits_b, "resumed_after_notice": resumed_b,
            "recovery_a": _phases(events, second, t_kill), "recovery_b": _phases(events, third, t_notice),
            "exits_after_stop": {w: (e.get("code"), e.get("saved_step"), e.get("notice")) for w, e in exits_c.items()},
            "setup_s": [[(e.get("how"), round(float(e.get("duration_s")), 1), round(e.t - job.t_launch, 1))
                         for e in ss] for ss in setups],  # per start: (how, seconds, when after the launch)
            "snapshots": [e.get("snapshot") for ss in setups for e in ss if e.get("snapshot")],  # what each publish said
            "stop_states": stop_states, "compared_step": compare, "ref_state": ref_status.get("state"),
            "report": {k: report.get(k) for k in ("state", "start", "end", "nodes", "recoveries", "preemptions", "failures", "wall_s",
                                                  "productive_s", "checkpoint_s", "lost_s", "recovery_s", "queue_s",
                                                  "phases", "run", "problems")},
            "interruptions": report.get("interruptions"),
            "logs": str(tmp_path),
        })
        print("\nslurm 2-node e2e:", json.dumps(m, indent=1, default=str))
        if os.environ.get("SUPERVISE_E2E_REPORT"):
            with open(os.environ["SUPERVISE_E2E_REPORT"], "w") as f:
                f.write(json.dumps(m, indent=1, default=str) + "\n")

        job_log = (tmp_path / f"{job.name}.log").read_text()
        assert len(starts) == 3, starts
        # (a) SkyPilot recovered from the lost node; both nodes resumed from the newest commit
        assert "RECOVERING" in m["skypilot_states"], m["skypilot_states"]
        assert len(set(resumed_a.values())) == 1 and resumed_a["node0"] >= committed_at_kill, (resumed_a, m["kill"])
        # (b) the notice on node 2: both saved the same step and committed it; node 2 exited 0 (its
        # ledger says 75), node 1 exited 75 last, srun reported 75, SkyPilot recovered; 0 steps lost
        saved = {s for _, s, _ in exits_b.values()}
        assert len(saved) == 1 and None not in saved, exits_b
        (saved_b,) = saved
        assert {c for c, _, _ in exits_b.values()} == {75} and exits_b["node1"][2] == "sigterm", exits_b
        assert Catalog(job.url).inspect(saved_b).state == "committed"
        assert set(resumed_b.values()) == {saved_b}, (resumed_b, exits_b)
        # SkyPilot saw one code for the job, the head's: "Job exited with exit code 75. Restarting ..."
        assert len(m["recovering_reasons"]) == 2 and "exit code 75" in m["recovering_reasons"][1], m["recovering_reasons"]
        # issue 25: the lost node's recovery is a new allocation with a fresh SkyPilot HOME: one node
        # restores the bucket's snapshot, the other waits for it and reuses; the notice's recovery
        # runs in place (the venv kept): both reuse. The first launch installed it.
        assert "installed" in hows[0] and hows[1] == ["restored", "reused"], (m["setup_s"], m["snapshots"])
        assert hows[2] == ["reused", "reused"], m["setup_s"]
        # the node's own hf fetched the tokenizer from the stand-in hub at the install
        infos = [p for _, p in hub.requests if p == f"/api/models/{HUB_REPO}/revision/main"]
        fetched = [p for meth, p in hub.requests if meth == "GET" and p.endswith("/tokenizer.json")]
        assert infos and fetched, hub.requests
        assert re.search(r"supervise setup: supervise-titan in \S+, Python 3\.11\.", job_log), job_log[-3000:]
        # (c) the stop: one final step, saved by both nodes, committed, deep-verified; no recovery
        final = {s for _, s, _ in m["exits_after_stop"].values()}
        assert len(final) == 1 and None not in final, m["exits_after_stop"]
        assert {c for c, _, _ in m["exits_after_stop"].values()} == {0}
        assert {n for _, _, n in m["exits_after_stop"].values()} == {"stop"}
        (final_step,) = final
        assert Catalog(job.url).inspect(final_step).state == "committed"
        assert f"saved and committed step {final_step}" in stopped.stdout + stopped.stderr
        verify = _run([SUPERVISE, "checkpoints", "verify", job.url, "--step", str(final_step), "--deep"], env)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert stop_status["state"] in ("CANCELLED", "SUCCEEDED") and stop_status["recoveries"] == 2, stop_status
        # bit-identical to the uninterrupted run, model and optimizer, after both recoveries
        assert ref_status["state"] == "SUCCEEDED", ref_status
        latest = Catalog(ref.url).latest()
        assert (latest.step, latest.state) == (STEPS, "committed"), latest.describe()
        ours = load_tensors(step_path(job.url, compare), model_only=False)
        theirs = load_tensors(step_path(ref.url, compare), model_only=False)
        assert ours and tensor_differences(ours, theirs) == []
        # (d) the report: 2 nodes, the recoveries and their causes, phases summing to the wall time
        assert report.get("nodes") == 2, report
        assert [ep["cause"] for ep in report["interruptions"]] == ["no_notice", "notice"], report["interruptions"]
        assert report["recoveries"] == 2 and report["preemptions"] == {"notice": 1, "no_notice": 1}, report
        assert [ep["resumed_step"] for ep in report["interruptions"]] == [resumed_a["node0"], saved_b]
        parts = sum(report[k] for k in ("productive_s", "checkpoint_s", "lost_s", "recovery_s", "queue_s"))
        assert abs(parts - report["wall_s"]) < 1.0, report
        # the report's span is SkyPilot's: from its PENDING row to its record's end_at
        assert abs(report["start"] - next(t for st, t, _ in sky if st == "PENDING")) < 5, (report["start"], sky)
        assert abs(report["end"] - _sky_end_at(sky_home, job.job_id)) < 5, (report["end"], sky)
