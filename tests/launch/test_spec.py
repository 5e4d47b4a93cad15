"""Recipes -> JobSpec: every validation rule gives one clear error naming the
field, exit code 2, and nothing is launched."""

from __future__ import annotations

import sys

import pytest
import yaml

from supervisor import cli
from supervisor.errors import SuperviseError
from supervisor.launch import skypilot
from supervisor.recipes import RECIPES_DIR, apply_set, build_spec, parse_set
from supervisor.spec import node_options, titan_configs, validate

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("SUPERVISE_BUCKET", "s3://my-ckpts/supervise")
    monkeypatch.setenv("SUPERVISE_HOME", str(tmp_path / "home"))
    for key in (*skypilot.LAUNCH_ENV, "HF_TOKEN"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def launches(monkeypatch):
    """Records launch attempts instead of reaching SkyPilot (must stay empty)."""
    calls = []
    monkeypatch.setattr(skypilot.SkyPilotBackend, "schedule", lambda self, request: calls.append(request.name) or "0")
    return calls


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["supervise", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def test_recipes_cover_torchtitan_llama3_configs():
    assert set(RECIPES) >= {"llama3_debug", "llama3_8b", "llama3_70b", "llama3_405b"}
    configs = titan_configs("llama3")
    assert {"llama3_debugmodel", "llama3_8b", "llama3_70b", "llama3_405b"} <= set(configs)
    assert configs["llama3_70b"] == {"tensor_parallel_degree": 8}
    for name in RECIPES:
        spec = build_spec(name)
        assert spec.model.config in configs


def test_set_overrides_nested_fields_and_flags_win():
    spec = build_spec(
        "llama3_8b",
        sets=["checkpoint.interval=50", "overrides.training.steps=20", "resources.accelerators.H100=8",
              "recovery.strategy=failover", "secrets=[HF_TOKEN, WANDB_API_KEY]", "resources.num_nodes=3"],
        num_nodes=4, infra="k8s", spot=True, name="exp-1",
    )
    assert spec.checkpoint.interval == 50
    assert spec.overrides["training.steps"] == 20
    assert spec.resources.num_nodes == 4 and spec.resources.infra == "k8s" and spec.resources.spot
    assert spec.recovery.strategy == "FAILOVER"
    assert spec.secrets == ["HF_TOKEN", "WANDB_API_KEY"]
    assert spec.name == "exp-1" and spec.checkpoints_url == "s3://my-ckpts/supervise/exp-1"


def test_env_values_are_text_as_in_skypilot():
    """`--set envs.PORT=8018` parses 8018 as a number; SkyPilot's Task.from_yaml_config
    stringifies env values, and so do we."""
    from sky.task import Task

    spec = build_spec("llama3_8b", sets=["envs.SUPERVISE_MASTER_PORT=8018", "envs.DEBUG=true"])
    assert spec.envs == {"SUPERVISE_MASTER_PORT": "8018", "DEBUG": "True"}
    sky_envs = Task.from_yaml_config({"run": "true", "envs": {"SUPERVISE_MASTER_PORT": 8018, "DEBUG": True}}).envs
    assert sky_envs == spec.envs


def test_parse_set_keeps_text_literal():
    assert parse_set("a.b=3") == ("a.b", 3)
    assert parse_set("a=x: y") == ("a", "x: y")
    assert parse_set("a=$(rm -rf /); `x`") == ("a", "$(rm -rf /); `x`")
    data: dict = {}
    apply_set(data, "overrides.optimizer.lr", 1e-4)
    assert data == {"overrides": {"optimizer.lr": 1e-4}}


def test_node_argv_mount_vs_direct():
    spec = build_spec("llama3_8b")
    argv = node_options(spec).to_argv()
    assert argv[:4] == ["supervise", "node", "--checkpoints", "s3://my-ckpts/supervise/llama3-8b"]
    assert argv[argv.index("--checkpoint-mount") + 1] == "/checkpoints/supervise/llama3-8b"  # root mounted, prefix kept
    tail = argv[argv.index("--") + 1:]
    assert tail[:4] == ["--module", "llama3", "--config", "llama3_8b"]
    direct = node_options(build_spec("llama3_8b", sets=["checkpoint.mode=direct"])).to_argv()
    assert "--checkpoint-mount" not in direct and "--commit-wait" not in direct


def test_r2_bucket_is_read_through_s3():
    spec = build_spec("llama3_8b", sets=["checkpoint.bucket=r2://my-r2/runs"])
    assert spec.checkpoints_url == "s3://my-r2/runs/llama3-8b"


BAD = [
    # (extra args, field named in the error)
    (["--set", "checkpoint.intervall=3"], "intervall"),
    (["--set", "resources.num_nodes=two"], "resources.num_nodes"),
    (["--num-nodes", "0"], "resources.num_nodes"),
    (["--set", "model.config=llama3_9b"], "model.config"),
    (["--set", "model.module=llama9"], "model.module"),
    (["--set", "resources.accelerators=H100:3"], "resources.accelerators"),
    (["--set", "checkpoint.bucket=/data/ckpts"], "checkpoint.bucket"),
    (["--set", "checkpoint.bucket=https://s3.amazonaws.com/b"], "checkpoint.bucket"),
    (["--set", "checkpoint.bucket=s3://Bad_Bucket/x"], "checkpoint.bucket"),
    (["--set", "checkpoint.mode=rsync"], "checkpoint.mode"),
    (["--set", "checkpoint.mount_path=ckpt"], "checkpoint.mount_path"),
    (["--set", "overrides.checkpoint.folder=/tmp/x"], "overrides"),
    (["--set", "overrides.--training.steps=3"], "overrides"),
    (["--set", "recovery.max_restarts_without_progress=-1"], "recovery.max_restarts_without_progress"),
    (["--set", "recovery.strategy=pray"], "recovery.strategy"),
    (["--set", "secrets=[]"], "secrets"),  # gated tokenizer without HF_TOKEN
    (["--set", "secrets=[NOT-A-NAME]"], "secrets"),
    (["--set", "name=Bad Name"], "name"),
    (["--set", "nosuchfield=1"], "nosuchfield"),
    (["--set", "checkpoint.interval"], "--set"),
    (["--infra", "nosuchcloud"], "resources.infra"),
]


@pytest.mark.parametrize("args,field", BAD, ids=[f"{a[-1]}" for a, _ in BAD])
def test_bad_input_is_one_clear_error_exit_2_nothing_launched(monkeypatch, capsys, launches, args, field):
    code, out, err = run_cli(monkeypatch, capsys, "start", "--spot", "llama3_70b", "--yes", *args)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert field in err
    assert launches == [] and out == ""


def test_unknown_key_in_recipe_file(monkeypatch, capsys, launches, tmp_path):
    data = yaml.safe_load((RECIPES_DIR / "llama3_8b.yaml").read_text())
    data["checkpoint"]["every"] = 10
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    code, _, err = run_cli(monkeypatch, capsys, "start", str(recipe), "--yes")
    assert code == 2 and "'checkpoint.every'" in err and "interval" in err  # names the field and the fix
    assert launches == []


def test_unset_bucket_variable(monkeypatch, capsys, launches):
    monkeypatch.delenv("SUPERVISE_BUCKET")
    code, _, err = run_cli(monkeypatch, capsys, "start", "llama3_8b", "--dry-run")
    assert code == 2 and "checkpoint.bucket" in err and "SUPERVISE_BUCKET" in err


def test_missing_secret_value_stops_launch(monkeypatch, capsys, launches):
    code, _, err = run_cli(monkeypatch, capsys, "start", "llama3_8b", "--yes")
    assert code == 2 and "HF_TOKEN" in err and "export" in err
    assert launches == []


def test_generic_s3_endpoint_needs_direct_mode(monkeypatch, capsys, launches):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    code, _, err = run_cli(monkeypatch, capsys, "start", "llama3_debug", "--dry-run")
    assert code == 2 and "checkpoint.mode" in err and "DIRECT" in err
    code, out, _ = run_cli(monkeypatch, capsys, "start", "llama3_debug", "--dry-run", "--set", "checkpoint.mode=DIRECT")
    assert code == 0 and "AWS_ENDPOINT_URL_S3: http://127.0.0.1:8333" in out  # S3 only on the nodes


def test_missing_recipe(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "start", "nope.yaml", "--dry-run")
    assert code == 2 and "llama3_8b" in err


def test_validate_plain_data_error_names_every_field():
    with pytest.raises(SuperviseError) as exc:
        validate({"name": "x", "model": {"config": "llama3_8b"}, "checkpoint": {"bucket": "s3://ok-bucket"},
                  "resources": {"num_nodes": "many", "gpus": 8}})
    assert "resources.num_nodes" in str(exc.value) and "'resources.gpus'" in str(exc.value)
