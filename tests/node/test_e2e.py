"""End to end through `supervise node` with real TorchTitan on CPU, real SeaweedFS
and real signals. Each test chains several incarnations of one run (as a managed
job would restart it) and ends by comparing the final weights and the loss curve
with an uninterrupted reference run: bit-identical, step for step."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from supervisor.contract.exitcodes import ExitCode
from supervisor.launch.local_controller import free_port
from supervisor.contract.runtime import heartbeat_steps
from supervisor.titan.results import load_tensors, read_losses, step_path, tensor_differences
from tests.node.fake_metadata import FakeMetadata, urls_for
from tests.fixtures_titan import INTERVAL, STEPS
from tests.node.nodeproc import cleanup, run_node, start_node, survivors, wait_for

pytestmark = pytest.mark.slow


def _step(run_dir: Path) -> int:
    return max(heartbeat_steps(run_dir).values(), default=0)


class Run:
    """One training run under `supervise node` (one rank per node), restarted like a managed
    job: every incarnation gets a fresh run dir and rendezvous port; all nodes share the URL."""

    def __init__(self, tmp_path: Path, name: str, url: str, trainer_args: list[str], nodes: int = 1):
        self.dir = tmp_path / name
        self.url, self.args, self.nodes = url, trainer_args, nodes
        self.incarnation = 0
        self.procs: list = []

    def start(self, extra: dict[int, list[str]] | None = None) -> list[Path]:
        self.incarnation += 1
        port = free_port()
        run_dirs = []
        self.procs = []
        for rank in range(self.nodes):
            run_dir = self.dir / f"inc{self.incarnation}-node{rank}"
            sky = {"SKYPILOT_NUM_NODES": str(self.nodes), "SKYPILOT_NODE_RANK": str(rank),
                   "SKYPILOT_NODE_IPS": "\n".join(["127.0.0.1"] * self.nodes)}  # fmt: skip
            args = ["--checkpoints", self.url, "--nproc-per-node", "1", "--master-port", str(port),
                    "--run-dir", str(run_dir), "--cloud", "none", *(extra or {}).get(rank, [])]  # fmt: skip
            self.procs.append(start_node(args, self.args, env=sky, log=self.dir / f"node{rank}.log"))
            run_dirs.append(run_dir)
        return run_dirs

    def wait(self, timeout: float = 600) -> list[int]:
        return [p.wait(timeout) for p in self.procs]

    def cleanup(self) -> None:
        for p in self.procs:
            cleanup(p)

    def resume_step(self) -> int | None:
        res = run_node("--dry-run", "--json", "--checkpoints", self.url, "--", *self.args)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)["resume_step"]

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("node*.log")))


def _assert_same_as_reference(run: Run, dump: Path, ref) -> None:
    """Model and optimizer at the last step bit-identical to the uninterrupted reference
    (tests/fixtures_titan.py: the same TorchTitan args under plain torchrun, shared by
    the trainer tests); every step's loss the same."""
    assert tensor_differences(load_tensors(step_path(run.url, STEPS), model_only=False), ref.final) == []
    losses = read_losses(dump)
    assert sorted(losses) == sorted(ref.losses) == list(range(1, STEPS + 1))
    assert losses == ref.losses


def _notice_and_check(run: Run, run_dirs: list[Path], deliver, at_least: int) -> int:
    """Deliver a notice once the run is past `at_least`; assert it saved at the next
    step boundary (0 steps lost) and that the restart will resume from exactly there."""
    wait_for(lambda: _step(run_dirs[0]) >= at_least, 300)
    done_before = _step(run_dirs[0])
    deliver()
    codes = run.wait()
    # every node's trainer writes the same outcome.json; the head exits 75 for the job,
    # the other nodes 0 before it (supervisor.contract.exitcodes.process_exit)
    assert codes == [ExitCode.PREEMPTED_SAVED] + [ExitCode.FINISHED] * (len(run_dirs) - 1), (codes, run.log())
    said = [json.loads((rd / "outcome.json").read_text()) for rd in run_dirs]
    assert all(s == said[0] for s in said), said
    outcome = json.loads((run_dirs[0] / "outcome.json").read_text())
    assert outcome["outcome"] == "preempted_saved" and outcome["step"] >= done_before
    assert run.resume_step() == outcome["step"]
    for p in run.procs:
        assert not survivors(p.tag)
    return outcome["step"]


def test_one_rank_kill_notice_corruption_and_hang(tmp_path, s3_url, titan_args, reference_run):
    ref = reference_run(1)
    dump = tmp_path / "run"
    run = Run(tmp_path, "run", f"{s3_url}/run", titan_args(dump, steps=STEPS, checkpoint_interval=INTERVAL))
    run.dir.mkdir(parents=True)
    try:
        # 1. SIGTERM to the wrapper's process group (what SkyPilot sends) after the commit of
        #    step 4: saved at once
        (rd,) = run.start()
        saved = _notice_and_check(run, [rd], lambda: os.killpg(run.procs[0].pid, signal.SIGTERM), INTERVAL + 2)
        assert saved % INTERVAL, "the notice step should not be a periodic one"

        # 2. newest checkpoint truncated: quarantined, resume from the previous commit;
        #    then a stopped worker: the watchdog ends the incarnation, nothing survives
        _truncate_newest_shard(run.url, saved)
        (rd,) = run.start(extra={0: ["--hang-timeout", "8"]})
        wait_for(lambda: _step(rd) >= INTERVAL + 1, 300)
        assert f"resuming from step {INTERVAL}" in run.log() and f"step {saved}" in run.log()
        for pid in _worker_pids(run.procs[0]):
            os.kill(pid, signal.SIGSTOP)
        assert run.wait() == [ExitCode.RETRYABLE]
        assert "hang" in run.log() and not survivors(run.procs[0].tag)

        # 3. the last incarnation finishes; same weights and losses as the reference
        run.start()
        assert run.wait() == [ExitCode.FINISHED], run.log()
    finally:
        run.cleanup()
    _assert_same_as_reference(run, dump, ref)


def test_two_nodes_rendezvous_and_a_cloud_notice_on_each_node(tmp_path, s3_url, titan_args, reference_run):
    """A notice on the head (AWS), then one on the other node (GCP): every node saves the
    same step, the head exits 75 for the job. Azure's source and the notice file take the
    same path through the wrapper (CI time): tests/node/test_notices.py detects every cloud's
    notice, Azure's slow first call too; tests/node/test_process.py,
    tests/launch/test_kubernetes.py and the emulator's chaos drive the notice file. Nodes
    lost without notice: the demo's kill (tests/test_demo.py, both nodes SIGKILLed), the
    Slurm test's lost node (tests/e2e/test_slurm_two_nodes.py)."""
    ref = reference_run(2)  # 2 ranks on one node: the same world, the same training
    dump = tmp_path / "run2"
    run = Run(tmp_path, "run2", f"{s3_url}/run2", titan_args(dump, steps=STEPS, checkpoint_interval=INTERVAL), nodes=2)
    run.dir.mkdir(parents=True)
    try:
        step = 0
        for cloud, node_rank in (("aws", 0), ("gcp", 1)):
            with FakeMetadata(cloud) as fake:
                urls = urls_for(fake)
                flags = ["--cloud", cloud, f"--{cloud}-metadata-url", urls[cloud], "--notice-poll", "0.2"]
                rds = run.start(extra={node_rank: flags})
                step = _notice_and_check(run, rds, lambda: fake.preempt(60), step + 1)

        assert step < STEPS, "both notices landed before training ended"

        run.start()
        assert run.wait() == [ExitCode.FINISHED, ExitCode.FINISHED], run.log()
    finally:
        run.cleanup()
    _assert_same_as_reference(run, dump, ref)


def _truncate_newest_shard(url: str, step: int) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(f"{url}/step-{step}")
    shard = sorted(p for p in fs.ls(root) if p.endswith(".distcp"))[0]
    data = fs.cat_file(shard)
    fs.pipe_file(shard, data[: len(data) // 2])


def _worker_pids(wrapper) -> list[int]:
    """The training ranks: descendants of the wrapper that run the trainer module."""
    import psutil

    procs = psutil.Process(wrapper.pid).children(recursive=True)
    return [p.pid for p in procs if "torchrun" not in " ".join(p.cmdline()) and "supervisor.titan.train" in " ".join(p.cmdline())]
