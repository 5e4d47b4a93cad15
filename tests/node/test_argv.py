"""The torchrun argv and trainer-arg rewriting: pure functions, no processes."""

import pytest

from supervisor.errors import SuperviseError
from supervisor.contract.exitcodes import ExitCode
from supervisor.node.resume import checkpoint_url, rewrite_trainer_args, validate_trainer_args
from supervisor.node.torchrun import Topology, topology_from_env, torchrun_argv

TT = ["--module", "llama3", "--config", "llama3_debugmodel"]


def test_skypilot_env_builds_the_example_command():
    env = {
        "SKYPILOT_NUM_NODES": "2",
        "SKYPILOT_NUM_GPUS_PER_NODE": "8",
        "SKYPILOT_NODE_RANK": "1",
        "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6\n",
    }
    topo = topology_from_env(env, gpus=8)
    argv = torchrun_argv(topo, TT, executable=["torchrun"])
    assert argv == [
        "torchrun", "--nnodes", "2", "--nproc_per_node", "8", "--node_rank", "1",
        "--master_addr=10.0.0.5", "--master_port=8008", "-m", "supervisor.titan.train", *TT,
    ]  # fmt: skip
    assert topo.accelerator == "gpu"


def test_single_node_cpu_defaults_and_override():
    topo = topology_from_env({}, gpus=0)
    assert topo == Topology(1, 1, 0, "127.0.0.1", 8008, "cpu")
    assert topology_from_env({}, gpus=0, nproc_per_node=2, master_port=29500).nproc_per_node == 2
    assert topology_from_env({}, gpus=4).nproc_per_node == 4


@pytest.mark.parametrize(
    "env",
    [
        {"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "2", "SKYPILOT_NODE_IPS": "a\nb"},
        {"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "-1", "SKYPILOT_NODE_IPS": "a\nb"},
        {"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "0"},
        {"SKYPILOT_NUM_NODES": "two"},
    ],
)
def test_incoherent_env_is_a_user_error(env):
    with pytest.raises(SuperviseError) as err:
        topology_from_env(env, gpus=0)
    assert err.value.exit_code == ExitCode.USER_ERROR


def test_checkpoint_url_follows_torchtitan_join_rules(tmp_path):
    cwd = str(tmp_path)
    assert checkpoint_url(TT, None, cwd) == f"{cwd}/outputs/checkpoint"
    assert checkpoint_url([*TT, "--dump_folder", "/d", "--checkpoint.folder=ck"], None, cwd) == "/d/ck"
    assert checkpoint_url([*TT, "--job.dump_folder", "s3://b/run"], None, cwd) == "s3://b/run/checkpoint"
    assert checkpoint_url([*TT, "--dump_folder", "/d", "--checkpoint.folder", "gs://b/x/"], None, cwd) == "gs://b/x"
    assert checkpoint_url([*TT, "--checkpoint.folder", "/abs"], None, cwd) == "/abs"
    assert checkpoint_url(TT, "rel/ck", cwd) == f"{cwd}/rel/ck"
    assert checkpoint_url(TT, "s3://b/p", cwd) == "s3://b/p"


def test_rewrite_replaces_user_checkpoint_flags():
    user = [
        *TT, "--checkpoint.folder=mine", "--checkpoint.load_step", "3", "--checkpoint.keep_latest_k", "5",
        "--checkpoint.enable", "--checkpoint.interval", "4", "--job.dump_folder", "/d",
    ]  # fmt: skip
    out = rewrite_trainer_args(user, "s3://b/p", 12)
    assert out == [
        *TT, "--checkpoint.interval", "4", "--dump_folder", "/d",
        "--checkpoint.enable", "--checkpoint.folder", "s3://b/p", "--checkpoint.keep_latest_k", "0",
        "--checkpoint.load_step", "12",
    ]  # fmt: skip
    fresh = rewrite_trainer_args([*TT, "--checkpoint.enable", "True"], "/c", None)
    assert fresh == [*TT, "--checkpoint.enable", "--checkpoint.folder", "/c", "--checkpoint.keep_latest_k", "0"]


@pytest.mark.parametrize(
    "args, words",
    [
        ([], "no trainer arguments"),
        (["--training.steps", "3"], "--module and --config"),
        (["--module", "llama9", "--config", "x"], "unknown TorchTitan module"),
        (["--module", "llama3", "--config", "llama3_nosuch"], "unknown TorchTitan config"),
    ],
)
def test_bad_trainer_args_are_user_errors(args, words):
    with pytest.raises(SuperviseError) as err:
        validate_trainer_args(args)
    assert err.value.exit_code == ExitCode.USER_ERROR and words in str(err.value)


def test_known_module_and_config_pass():
    validate_trainer_args(TT)
    validate_trainer_args(["--module=llama3", "--config=llama3_8b"])
