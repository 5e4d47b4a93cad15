"""JobSpec -> sky.Task: the rendered task round-trips through SkyPilot's own
validation and says what a managed spot run needs. No cloud is contacted."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from supervisor import cli, registry
from supervisor.errors import SuperviseError
from supervisor.exitcodes import ExitCode
from supervisor import launch
from supervisor.launch import setup, skypilot
from supervisor.launch.base import is_terminal
from supervisor.recipes import RECIPES_DIR, build_spec

GOLDEN = Path(__file__).parent / "golden" / "skypilot"
RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
SECRET = "hf_sentinel_do_not_print_0123456789"


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    for key in (*skypilot.STORE_SECRETS, *skypilot.STORE_ENVS):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SUPERVISE_BUCKET", "s3://my-ckpts/supervise")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("SUPERVISE_HOME", str(tmp_path / "home"))


def dry_run(monkeypatch, capsys, *args) -> str:
    monkeypatch.setattr(sys, "argv", ["supervise", "start", *args, "--dry-run"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    assert (exc.value.code or 0) == 0, out.err
    return out.out


@pytest.mark.parametrize("recipe", RECIPES)
def test_dry_run_matches_golden_and_round_trips(monkeypatch, capsys, recipe):
    import sky

    text = dry_run(monkeypatch, capsys, "--spot", recipe)
    golden = GOLDEN / f"{recipe}.yaml"
    if os.environ.get("SUPERVISE_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()

    config = yaml.safe_load(text)
    task = sky.Task.from_yaml_config(copy.deepcopy(config))  # SkyPilot's own validation
    spec = build_spec(recipe, spot=True)

    assert task.num_nodes == spec.resources.num_nodes
    resources = list(task.resources)
    assert all(r.use_spot for r in resources)
    wanted = spec.resources.accelerators
    got = [r.accelerators for r in resources]
    if wanted:  # the seed's any-of: one Resources per accelerator choice
        assert sorted(json.dumps(a, sort_keys=True) for a in got) == sorted(
            json.dumps({k: v}) for k, v in wanted.items())
        assert wanted == {"H100": 8, "H200": 8}
    for r in resources:
        rec = r.job_recovery
        assert rec["recover_on_exit_codes"] == [ExitCode.PREEMPTED_SAVED, ExitCode.RETRYABLE]
        assert ExitCode.USER_ERROR not in rec["recover_on_exit_codes"]
        assert rec["max_restarts_on_errors"] == 0  # 78 never retried: SkyPilot's only "no retry" is a zero budget
        assert rec.get("strategy") is None  # SkyPilot's default unless the recipe says otherwise
        assert r.disk_size == spec.resources.disk_size

    mount = task.storage_mounts["/checkpoints"]
    assert mount.source == "s3://my-ckpts/supervise"
    assert mount.mode.value == "MOUNT_CACHED"

    assert SECRET not in text
    assert "HF_TOKEN" not in (task.envs or {})
    if "HF_TOKEN" in spec.secrets:
        assert config["secrets"] == {"HF_TOKEN": "<redacted>"}

    assert f"exec supervise node --checkpoints {spec.checkpoints_url}" in task.run
    assert f"--checkpoint-mount /checkpoints/{spec.name}" in task.run
    assert f"--config {spec.model.config}" in task.run
    assert "pip install torch==" in task.setup and "supervise==" in task.setup


def test_live_task_carries_secret_values_only_in_secrets():
    task = launch.dryrun(build_spec("llama3_8b", spot=True), backend="skypilot")[1].task
    assert task.secrets["HF_TOKEN"].get_secret_value() == SECRET
    assert SECRET not in json.dumps(task.envs)


def test_store_credentials_go_to_secrets_endpoint_to_envs(monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA_SENTINEL")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws_secret_sentinel")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://acct.r2.cloudflarestorage.com")
    text = dry_run(monkeypatch, capsys, "llama3_8b", "--set", "checkpoint.bucket=r2://my-r2/runs")
    config = yaml.safe_load(text)
    assert "AKIA_SENTINEL" not in text and "aws_secret_sentinel" not in text
    assert set(config["secrets"]) == {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert config["envs"]["AWS_ENDPOINT_URL"] == "https://acct.r2.cloudflarestorage.com"
    assert config["file_mounts"]["/checkpoints"]["source"] == "r2://my-r2/runs"
    assert "--checkpoints s3://my-r2/runs/llama3-8b" in config["run"]


def test_direct_mode_writes_to_the_bucket_without_a_mount(monkeypatch, capsys):
    import sky

    text = dry_run(monkeypatch, capsys, "llama3_debug", "--set", "checkpoint.mode=DIRECT", "--infra", "slurm")
    task = sky.Task.from_yaml_config(yaml.safe_load(text))
    assert not task.storage_mounts and not task.file_mounts
    assert "--checkpoints s3://my-ckpts/supervise/llama3-debug --" in task.run
    assert all(str(r.cloud).lower() == "slurm" for r in task.resources)


def test_set_value_with_shell_metacharacters_is_quoted_in_run(monkeypatch, capsys, tmp_path):
    """Execute the rendered run script with a stand-in `supervise` that records its argv."""
    nasty = "it's; $(touch PWNED) `touch PWNED2` \"q\" | & > out < in * ~ \\ $HOME"
    text = dry_run(monkeypatch, capsys, "llama3_8b", "--set", f"overrides.job.description={nasty}",
                   "--set", "envs.MSG=x y")
    run = yaml.safe_load(text)["run"]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    standin = bindir / "supervise"
    standin.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open('argv.json', 'w'))\n")
    standin.chmod(standin.stat().st_mode | stat.S_IEXEC)
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path / "home")}
    proc = subprocess.run(["bash", "-c", run], cwd=work, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads((work / "argv.json").read_text())
    assert argv[argv.index("--job.description") + 1] == nasty
    assert sorted(p.name for p in work.iterdir()) == ["argv.json"]  # nothing ran, nothing redirected


def test_run_exit_code_is_the_wrappers(monkeypatch, capsys, tmp_path):
    """`exec` makes the node's exit code (75 = preempted and saved) the job's, for recover_on_exit_codes."""
    run = yaml.safe_load(dry_run(monkeypatch, capsys, "llama3_debug"))["run"]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "supervise").write_text("#!/bin/sh\nexit 75\n")
    (bindir / "supervise").chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    assert subprocess.run(["bash", "-c", run], env=env, timeout=30).returncode == ExitCode.PREEMPTED_SAVED


def test_sky_errors_name_the_fixing_command():
    from sky import exceptions

    cases = {
        exceptions.ApiServerConnectionError("http://127.0.0.1:46580"): "sky api start",
        exceptions.NoCloudAccessError("No cloud access available."): "sky check",
        exceptions.InvalidCloudCredentials("aws: bad keys"): "sky check",
        exceptions.ResourcesUnavailableError("no H100 spot"): "--infra",
    }
    for err, fix in cases.items():
        msg = str(skypilot.explain_sky_error(err))
        assert fix in msg and "\n" not in msg


def test_summary_names_what_will_run():
    rows = dict(skypilot.summary(build_spec("llama3_8b", spot=True)))
    assert rows["nodes"] == "2" and rows["capacity"] == "spot"
    assert "H100:8 or H200:8" in rows["accelerators"]
    assert "s3://my-ckpts/supervise/llama3-8b" in rows["checkpoints"]
    assert "[75, 69]" in rows["recovery"]
    assert rows["estimated cost"] == "unknown" or rows["estimated cost"].startswith("$")


def test_status_logs_stop_dispatch_local_jobs_to_local_backend(monkeypatch, capsys):
    registry.record("mine", backend="local", checkpoints_url="s3://my-ckpts/supervise/mine")
    monkeypatch.setattr(sys, "argv", ["supervise", "logs", "mine"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code != 0 and "local job" in err  # LocalLauncher answered, SkyPilot was not asked


def test_status_json_lists_local_jobs_without_skypilot(monkeypatch, capsys):
    """With no SkyPilot API server, `status --json` still lists local jobs and warns in one line."""
    from supervisor.launch import local
    from supervisor.launch.base import JobStatus

    monkeypatch.setattr(local.LocalBackend, "status",
                        lambda self, name=None: [JobStatus("mine", "local", "RUNNING", recoveries=2)])
    monkeypatch.setattr(skypilot.SkyPilotBackend, "status",
                        lambda self, name=None: (_ for _ in ()).throw(SuperviseError("SkyPilot down; `sky api start`")))
    registry.record("other", backend="skypilot", checkpoints_url="s3://my-ckpts/supervise/other")
    monkeypatch.setattr(sys, "argv", ["supervise", "status", "--json"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    assert (exc.value.code or 0) == 0
    rows = json.loads(out.out)
    assert rows[0]["name"] == "mine" and rows[0]["recoveries"] == 2 and rows[0]["state"] == "RUNNING"
    assert {"step", "checkpoint_time", "goodput", "backend"} <= set(rows[0])
    assert "sky api start" in out.err


def _fake_venv(venv: Path, *, healthy: bool) -> None:
    """A stand-in venv: bin/python answers the health check, bin/pip records its argv."""
    (venv / "bin").mkdir(parents=True)
    (venv / "marker").write_text("old venv")
    (venv / "bin" / "python").write_text(f"#!/bin/sh\nexit {0 if healthy else 1}\n")
    (venv / "bin" / "pip").write_text('#!/bin/sh\necho "$@" >> "$HOME/pip.log"\n')
    (venv / "bin" / "activate").write_text(f'PATH="{venv}/bin:$PATH"\n')
    for exe in ("python", "pip"):
        (venv / "bin" / exe).chmod(0o755)


def _run_setup(tmp_path, spec, *, venv_state: str | None) -> tuple[subprocess.CompletedProcess, Path]:
    """Execute the rendered setup in a scratch HOME; `python3 -m venv` makes a healthy stand-in venv."""
    home = tmp_path / "home"
    venv = home / ".supervise" / "venv"
    if venv_state:
        _fake_venv(venv, healthy=venv_state == "healthy")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").write_text(
        f"#!{sys.executable}\nimport sys, pathlib\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_skypilot import _fake_venv\n"
        "assert sys.argv[1:3] == ['-m', 'venv'], sys.argv\n"
        "_fake_venv(pathlib.Path(sys.argv[3]), healthy=True)\n"
        "(pathlib.Path(sys.argv[3]) / 'marker').write_text('new venv')\n")
    (bindir / "python").write_text("#!/bin/sh\nexit 0\n")  # the image python (tokenizer step)
    for exe in ("python3", "python"):
        (bindir / exe).chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(home)}
    proc = subprocess.run(["bash", "-c", setup.setup_script(spec)], env=env, capture_output=True,
                          text=True, timeout=60)
    return proc, venv


@pytest.mark.parametrize("venv_state", [None, "healthy", "damaged"])
def test_setup_rebuilds_a_missing_or_damaged_venv_and_reuses_a_healthy_one(tmp_path, venv_state):
    proc, venv = _run_setup(tmp_path, build_spec("llama3_debug"), venv_state=venv_state)
    assert proc.returncode == 0, proc.stderr
    expected = "old venv" if venv_state == "healthy" else "new venv"
    assert (venv / "marker").read_text() == expected
    pip_log = (tmp_path / "home" / "pip.log").read_text()
    assert "torchtitan==" in pip_log  # installs always run: quick no-ops in a healthy venv


@pytest.mark.parametrize("venv_state", ["healthy", "damaged"])
def test_setup_without_pip_drops_a_damaged_venv_so_the_image_python_runs(tmp_path, venv_state):
    spec = build_spec("llama3_debug", sets=["install.pip=false"])
    proc, venv = _run_setup(tmp_path, spec, venv_state=venv_state)
    assert proc.returncode == 0, proc.stderr
    assert venv.exists() == (venv_state == "healthy")
    assert not (tmp_path / "home" / "pip.log").exists()


QUEUE = [
    {"job_id": 3, "job_name": "run-a", "status": "SUCCEEDED"},
    {"job_id": 7, "job_name": "run-a", "status": "RUNNING"},
    {"job_id": 5, "job_name": "run-b", "status": "FAILED_SETUP"},
]


def test_find_job_prefers_the_recorded_id_then_the_newest_of_the_name():
    assert skypilot.find_job(QUEUE, "run-a", "3") == (3, "SUCCEEDED")  # recorded at launch, finished
    assert skypilot.find_job(QUEUE, "run-a", None) == (7, "RUNNING")  # newest of that name
    assert skypilot.find_job(QUEUE, "run-a", "5") == (7, "RUNNING")  # id 5 is another job's
    assert skypilot.find_job([], "run-a", "3") == (3, None)  # the queue forgot it; the id still tails
    with pytest.raises(SuperviseError, match="sky jobs queue"):
        skypilot.find_job(QUEUE, "nope", None)


def test_finished_states():
    assert all(is_terminal(s) for s in ("SUCCEEDED", "CANCELLED", "FAILED", "FAILED_SETUP",
                                        "FAILED_NO_RESOURCE", "FAILED_CONTROLLER"))
    assert not any(is_terminal(s) for s in ("PENDING", "STARTING", "RUNNING", "RECOVERING",
                                            "CANCELLING", None))


def _cli(monkeypatch, *argv) -> int:
    monkeypatch.setattr(sys, "argv", ["supervise", *argv])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code or 0


def test_logs_and_stop_of_a_finished_job_use_its_id(monkeypatch, capsys):
    """The SkyPilot API server is replaced at the SDK boundary (none runs here): what we pass is checked."""
    import sky

    calls = []
    registry.record("run-b", backend="skypilot", checkpoints_url="s3://my-ckpts/supervise/run-b", job_id="5")
    monkeypatch.setattr(skypilot, "_queue", lambda: QUEUE)
    monkeypatch.setattr(sky.jobs, "tail_logs", lambda **kw: calls.append(("tail", kw)) or 0)
    monkeypatch.setattr(sky.jobs, "cancel", lambda **kw: calls.append(("cancel", kw)))

    assert _cli(monkeypatch, "logs", "run-b", "--follow") == 0
    assert calls[0][1]["job_id"] == 5 and calls[0][1]["follow"] is False  # finished: nothing to follow
    assert "name" not in calls[0][1]

    assert _cli(monkeypatch, "stop", "run-b") == 0
    assert "already finished: FAILED_SETUP" in capsys.readouterr().out
    assert [c for c, _ in calls] == ["tail"]  # SkyPilot was not asked to cancel
