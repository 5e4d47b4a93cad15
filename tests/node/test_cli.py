"""`supervise node` as users call it: bad input -> one line + exit 78, a store that
cannot be reached -> one line + exit 69; --dry-run --json with a real catalog (a real
DCP save, committed, then corrupted)."""

import json
import warnings
from pathlib import Path

import pytest

from supervisor.contract.exitcodes import ExitCode
from supervisor.launch.local_controller import free_port
from tests.node.nodeproc import run_node

TT = ["--module", "llama3", "--config", "llama3_debugmodel"]


@pytest.mark.parametrize(
    "args, env, words",
    [
        (["--dry-run", "--"], {}, "no trainer arguments"),
        (["--"], {}, "no trainer arguments"),
        (["--dry-run", "--", "--module", "llama9", "--config", "x"], {}, "unknown TorchTitan module"),
        (["--dry-run", "--", "--module", "llama3", "--config", "llama3_tiny"], {}, "unknown TorchTitan config"),
        (["--dry-run", "--", *TT], {"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "2",
                                    "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1"}, "out of range"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_78(args, env, words):
    _one_error_line(run_node(*args, env=env), ExitCode.USER_ERROR, words)


def test_unreachable_store_is_retryable_69():
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y", "SUPERVISE_STORE_RETRY_S": "1"}  # fmt: skip
    _one_error_line(run_node("--dry-run", "--checkpoints", "s3://bucket/run", "--", *TT, env=env), ExitCode.RETRYABLE,
                    "unreachable")  # fmt: skip


def test_store_that_refuses_is_78(s3_store, s3_env):
    """A real store that answers "no such bucket" / "access denied": no retry can fix that."""
    res = run_node("--dry-run", "--checkpoints", "s3://no-such-bucket/run", "--", *TT, env=s3_env)
    _one_error_line(res, ExitCode.USER_ERROR, "does not exist")
    res = run_node("--dry-run", "--checkpoints", s3_store.url("run"), "--", *TT, env={**s3_env, "AWS_SECRET_ACCESS_KEY": "wrong"})
    _one_error_line(res, ExitCode.USER_ERROR, "refused")


def _one_error_line(res, code, words):
    assert res.returncode == code, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]  # retry warnings may precede it
    assert len(errors) == 1 and lines[-1] == errors[0] and words in errors[0], res.stderr
    assert "Traceback" not in res.stderr


def _dcp_save(path: Path, step: int) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process, no process group: intended
        dcp.save({"w": torch.randn(4096)}, checkpoint_id=str(path / f"step-{step}"))


def test_dry_run_json_resumes_from_newest_verified_step(tmp_path):
    from supervisor.store.catalog import Catalog

    ck = tmp_path / "ck"
    for step in (2, 4):
        _dcp_save(ck, step)
        Catalog(str(ck)).commit(step, world_size=1, writer="test")
    env = {"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "1", "SKYPILOT_NODE_IPS": "10.1.0.1\n10.1.0.2",
           "SKYPILOT_NUM_GPUS_PER_NODE": "2"}  # fmt: skip
    res = run_node("--dry-run", "--json", "--", *TT, "--dump_folder", str(tmp_path), "--checkpoint.folder", "ck", env=env)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["resume_step"] == 4
    cmd = plan["command"]
    assert cmd[cmd.index("--checkpoint.load_step") + 1] == "4"
    assert cmd[cmd.index("--checkpoint.folder") + 1] == str(ck)
    assert cmd[cmd.index("--node_rank") + 1] == "1" and "--master_addr=10.1.0.1" in cmd

    shard = next((ck / "step-4").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # newest checkpoint truncated
    res = run_node("--dry-run", "--", *TT, "--dump_folder", str(tmp_path), "--checkpoint.folder", "ck")
    assert res.returncode == 0, res.stderr
    first = res.stdout.splitlines()[0]
    assert first.startswith("resuming from step 2") and "step 4" in first, first
    assert "--checkpoint.load_step 2" in res.stdout
