"""Commits with real TorchTitan on CPU and a real SeaweedFS: they never stall
training (background committer), and commits that keep failing end the
incarnation retryable instead of training on unsaved."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import fsspec
import pytest

from supervisor.contract.exitcodes import ExitCode
from supervisor.store.catalog import Catalog
from supervisor.store.local_server import LocalObjectStore
from tests.fixtures_titan import checkpoint_args, start_trainer
from tests.node.nodeproc import cleanup, start_node
from tests.store.tcp_proxy import FaultProxy

pytestmark = pytest.mark.slow


class Uploader(threading.Thread):
    """Stands in for a cached bucket mount's write-back (rclone --vfs-cache-mode
    full; no FUSE here): files TorchTitan writes locally reach the bucket later,
    through the S3 API, each time they change."""

    def __init__(self, local: Path, url: str):
        super().__init__(daemon=True)
        self.local, self.url, self.stop = local, url, threading.Event()
        self.fs, self.root = fsspec.core.url_to_fs(url, skip_instance_cache=True, use_listings_cache=False)

    def run(self) -> None:
        sent: dict[Path, tuple] = {}
        while not self.stop.wait(0.2):
            for path in sorted(self.local.rglob("*")):
                stat = path.stat() if path.is_file() else None
                if stat and sent.get(path) != (stat.st_size, stat.st_mtime_ns):
                    self.fs.put_file(str(path), f"{self.root}/{path.relative_to(self.local).as_posix()}")
                    sent[path] = (stat.st_size, stat.st_mtime_ns)


def test_a_frozen_store_does_not_stall_training_and_commits_land_after(tmp_path, titan_args, monkeypatch):
    steps, interval = 12, 4
    with LocalObjectStore(tmp_path / "s3") as store:
        for key, value in store.env.items():
            monkeypatch.setenv(key, value)
        url, local = store.url("run/checkpoint"), tmp_path / "mnt"
        local.mkdir()
        uploader = Uploader(local, url)
        uploader.start()
        env = {"SUPERVISE_CHECKPOINTS": url, "SUPERVISE_COMMIT_WAIT_S": "900", "SUPERVISE_STORE_RETRY_S": "900",
               "SUPERVISE_WRITE_MODE": "mount"}  # the wrapper's word for a folder that is a mount of the bucket
        run = start_trainer([*titan_args(tmp_path / "dump", steps=steps, checkpoint_interval=interval),
                             *checkpoint_args(local)], tmp_path / "run", nproc=2, env=env)  # fmt: skip
        try:
            run.wait_step(interval + 1, timeout=900)
            os.kill(store.pid, signal.SIGSTOP)  # the store hangs: requests wait, nothing answers
            try:
                # frozen until both ranks saved the next checkpoint step into the frozen store and
                # trained 2 steps past it: the save, its upload and its commit wait, training does not
                past_a_save, since = 2 * interval + 2, time.monotonic()
                while min(run.heartbeat_steps().get(r, 0) for r in (0, 1)) < past_a_save:
                    assert time.monotonic() - since < 900 and run.proc.poll() is None, run.tail()
                    time.sleep(0.5)
            finally:
                os.kill(store.pid, signal.SIGCONT)
            assert run.wait(900) == 0, run.tail()
        finally:
            uploader.stop.set()
            if run.proc.poll() is None:
                run.kill()
        assert run.outcome()["outcome"] == "finished", (run.outcome(), run.tail())
        cat = Catalog(url)
        states = {i.step: i.state for i in cat.list()}
        assert states == {s: "committed" for s in range(interval, steps + 1, interval)}, states
        assert cat.latest().step == steps


def test_denied_commit_markers_raise_no_pointer_and_end_retryable(tmp_path, s3_store, s3_url, titan_args):
    with FaultProxy(s3_store.ports["s3"]) as proxy:
        proxy.deny(rb"^PUT [^ ]*/step-\d+/_COMMIT\.json")  # a bucket policy that forbids the marker
        env = {"AWS_ENDPOINT_URL": proxy.endpoint, "SUPERVISE_STORE_RETRY_S": "2"}
        args = titan_args(tmp_path / "dump", steps=12, checkpoint_interval=4)
        log = tmp_path / "node.log"
        node = start_node(["--checkpoints", s3_url, "--run-dir", str(tmp_path / "run"), "--cloud", "none"], args,
                          env=env, log=log)  # fmt: skip
        try:
            code = node.wait(900)
        finally:
            cleanup(node)
    text = log.read_text(errors="replace")
    assert code == ExitCode.RETRYABLE, text[-3000:]
    assert "exit 69: 2 consecutive checkpoint commits failed (step 4: " in text and "step 8: " in text, text[-3000:]
    assert proxy.denied >= 2
    fs, root = fsspec.core.url_to_fs(s3_url, skip_instance_cache=True, use_listings_cache=False)
    assert not fs.exists(f"{root}/LATEST") and not fs.exists(f"{root}/step-4/_COMMIT.json")
    latest = Catalog(s3_url).latest()  # no pointer: read like plain TorchTitan output, nothing was promised
    assert latest.state == "legacy" and latest.step == 8, latest


def test_a_step_saved_again_needs_its_own_commit_and_the_old_files_are_kept(tmp_path, titan_args):
    from supervisor.contract.runtime import ENV_RESUME_STEP, NOTICE_FILE, write_json_atomic
    from supervisor.titan.results import dcp_reader, read_losses

    ckpt, dump, run_dir = tmp_path / "ckpt", tmp_path / "dump", tmp_path / "run"
    env = {"SUPERVISE_CHECKPOINTS": str(ckpt)}
    # Asked for a model-only last save: it is full state anyway, so the run can be extended.
    first = start_trainer([*titan_args(dump, steps=8, checkpoint_interval=4), "--checkpoint.last_save_model_only",
                           *checkpoint_args(ckpt)], run_dir, env=env)  # fmt: skip
    assert first.wait(900) == 0, first.tail()
    cat = Catalog(str(ckpt))
    assert cat.latest().step == 8
    assert any(k.startswith("optimizer.") for k in dcp_reader(str(ckpt / "step-8")).read_metadata().state_dict_metadata)
    old = cat.inspect(8).manifest
    shard = ckpt / "step-8" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert cat.latest().step == 4  # 8 quarantined

    args = titan_args(dump, steps=12, checkpoint_interval=4)
    again = start_trainer([*args, *checkpoint_args(ckpt, load_step=4)], run_dir,
                          env={**env, ENV_RESUME_STEP: "4", "SUPERVISE_INCARNATION": "b"})  # fmt: skip
    aside = ckpt / "step-8" / "_superseded"
    deadline = time.monotonic() + 900
    while not aside.exists():  # the re-save of step 8 has begun
        assert time.monotonic() < deadline and again.proc.poll() is None, again.tail()
        time.sleep(0.01)
    write_json_atomic(run_dir / NOTICE_FILE, {"source": "file", "received_at": time.time(), "deadline": None})
    assert again.wait(900) == 0, again.tail()
    outcome = again.outcome()
    assert outcome["outcome"] == "preempted_saved" and outcome["step"] >= 8, outcome
    info = cat.inspect(8)
    assert info.state == "committed" and info.manifest["created"] != old["created"]  # its own, new commit
    assert cat.latest().step == outcome["step"]
    (kept,) = list(aside.iterdir())
    assert {"_COMMIT.json", "_QUARANTINE.json", "__0_0.distcp", ".metadata"} <= {p.name for p in kept.iterdir()}
    assert (kept / "__0_0.distcp").stat().st_size < shard.stat().st_size  # the truncated evidence

    (run_dir / NOTICE_FILE).unlink()
    saved = outcome["step"]
    resumed = start_trainer([*args, *checkpoint_args(ckpt, load_step=saved)], run_dir,
                            env={**env, ENV_RESUME_STEP: str(saved), "SUPERVISE_INCARNATION": "c"})  # fmt: skip
    assert resumed.wait(900) == 0, resumed.tail()
    assert min(read_losses(dump, incarnation="c")) == saved + 1  # 0 steps lost


class BucketWatch(threading.Thread):
    """Lists the catalog every 0.1 s: which steps carry a commit marker, snapshot by snapshot."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.fs, self.root = fsspec.core.url_to_fs(url, skip_instance_cache=True, use_listings_cache=False)
        self.snapshots: list[set[int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                names = self.fs.find(self.root)
            except FileNotFoundError:
                continue
            self.snapshots.append({int(p.split("/step-")[1].split("/")[0]) for p in names
                                   if p.endswith("/_COMMIT.json") and "/_superseded/" not in p})  # fmt: skip

    def in_progress(self) -> set[int]:
        names = self.fs.find(self.root)
        started = {int(p.split("/step-")[1].split("/")[0]) for p in names if "/step-" in p}
        return started - (self.snapshots[-1] if self.snapshots else set())


def test_keep_two_during_a_two_rank_run_killed_mid_save(tmp_path, s3_store, s3_url, titan_args, reference_run):
    from supervisor.contract.runtime import ENV_RESUME_STEP
    from supervisor.titan.results import load_tensors, read_losses, step_path, tensor_differences
    from tests.fixtures_titan import STEPS

    ref = reference_run(2)  # saves every INTERVAL steps; this run every 2: the same training
    dump, run_dir = tmp_path / "dump", tmp_path / "run"
    args = [*titan_args(dump, steps=STEPS, checkpoint_interval=2), *checkpoint_args(s3_url)]
    watch = BucketWatch(s3_url)
    watch.start()
    with FaultProxy(s3_store.ports["s3"]) as proxy:
        proxy.delay_s = 0.002  # stretches each save so that the kill lands inside one
        env = {"AWS_ENDPOINT_URL": proxy.endpoint, "SUPERVISE_CHECKPOINTS": s3_url, "SUPERVISE_CHECKPOINT_KEEP": "2"}
        run = start_trainer(args, run_dir, nproc=2, env={**env, "SUPERVISE_INCARNATION": "a"})
        try:
            deadline = time.monotonic() + 900
            while not (watch.snapshots and max(watch.snapshots[-1], default=0) >= 4 and watch.in_progress()):
                assert time.monotonic() < deadline and run.proc.poll() is None, run.tail()
                time.sleep(0.02)
        finally:
            run.kill()  # mid-save of the step after the newest committed one
        latest = Catalog(s3_url).latest()
        assert latest.step is not None and latest.step >= 4
        again = start_trainer(args, run_dir, nproc=2,
                              env={**env, "SUPERVISE_INCARNATION": "b", ENV_RESUME_STEP: str(latest.step)})  # fmt: skip
        assert again.wait(900) == 0, again.tail()
    time.sleep(0.3)
    watch.stop.set()
    watch.join()
    seen = [s for s in watch.snapshots if s]
    assert all(max(b) >= max(a) for a, b in zip(seen, seen[1:])), seen  # the newest commit never vanished
    assert all(len(s) <= 3 for s in seen) and seen[-1] == {STEPS - 2, STEPS}, seen  # keep 2 (+1 while pruning)
    assert tensor_differences(load_tensors(step_path(s3_url, STEPS), model_only=False), ref.final) == []
    resumed = read_losses(dump, incarnation="b")
    assert resumed == {s: ref.losses[s] for s in range(latest.step + 1, STEPS + 1)}


def test_async_saves_kill_and_notice_during_an_upload_then_bit_identical(tmp_path, s3_store, s3_url, titan_args,
                                                                         reference_run):  # fmt: skip
    """TorchTitan `async_mode async` on 2 ranks (issue 12): the committer commits an
    async save once its upload is done; a SIGKILL during an upload loses nothing
    committed; a notice during one waits for it (or saves the next step) and exits
    saved; the resumed run ends bit-identical to the reference."""
    from supervisor.contract.runtime import ENV_RESUME_STEP, NOTICE_FILE, write_json_atomic
    from supervisor.titan.results import load_tensors, read_losses, step_path, tensor_differences
    from tests.fixtures_titan import STEPS

    ref = reference_run(2)
    dump, run_dir = tmp_path / "dump", tmp_path / "run"
    args = [*titan_args(dump, steps=STEPS, checkpoint_interval=2), "--checkpoint.async_mode", "async",
            *checkpoint_args(s3_url)]  # fmt: skip
    watch = BucketWatch(s3_url)
    watch.start()

    def wait_upload(run, newer_than: int) -> None:
        deadline = time.monotonic() + 900
        while not (watch.snapshots and max(watch.snapshots[-1], default=0) >= newer_than and watch.in_progress()):
            assert time.monotonic() < deadline and run.proc.poll() is None, run.tail()
            time.sleep(0.02)

    with FaultProxy(s3_store.ports["s3"]) as proxy:
        proxy.delay_s = 0.002  # uploads take long enough to land a kill or a notice inside one
        env = {"AWS_ENDPOINT_URL": proxy.endpoint, "SUPERVISE_CHECKPOINTS": s3_url}
        run = start_trainer(args, run_dir, nproc=2, env={**env, "SUPERVISE_INCARNATION": "a"})
        try:
            wait_upload(run, 2)
        finally:
            run.kill()
        first = Catalog(s3_url).latest().step
        assert first is not None and first >= 2
        run = start_trainer(args, run_dir, nproc=2, env={**env, "SUPERVISE_INCARNATION": "b", ENV_RESUME_STEP: str(first)})
        wait_upload(run, first)
        write_json_atomic(run_dir / NOTICE_FILE, {"source": "file", "received_at": time.time(), "deadline": None})
        assert run.wait(900) == 0, run.tail()
        outcome = run.outcome()
        assert outcome["outcome"] == "preempted_saved" and Catalog(s3_url).latest().step == outcome["step"], outcome
        (run_dir / NOTICE_FILE).unlink()
        saved = outcome["step"]
        run = start_trainer(args, run_dir, nproc=2, env={**env, "SUPERVISE_INCARNATION": "c", ENV_RESUME_STEP: str(saved)})
        assert run.wait(900) == 0, run.tail()
    watch.stop.set()
    assert tensor_differences(load_tensors(step_path(s3_url, STEPS), model_only=False), ref.final) == []
    assert read_losses(dump, incarnation="c") == {s: ref.losses[s] for s in range(saved + 1, STEPS + 1)}
