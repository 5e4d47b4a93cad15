"""JobSpec -> sky.Task: the rendered task round-trips through SkyPilot's own
validation and says what a managed spot run needs. No cloud is contacted."""

from __future__ import annotations

import copy
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from supervisor import cli, registry
from supervisor.errors import SuperviseError
from supervisor.contract.exitcodes import ExitCode
from supervisor import launch
from supervisor.launch import skypilot
from supervisor.launch.base import is_terminal
from supervisor.recipes import RECIPES_DIR, build_spec

GOLDEN = Path(__file__).parent / "golden" / "skypilot"
RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
SECRET = "hf_sentinel_do_not_print_0123456789"


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    for key in (*skypilot.LAUNCH_ENV, "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    # No AWS credentials anywhere (files, IMDS): the bucket's location cannot be read, the
    # same on every machine, so the rendered task is FAILOVER without a pinned region.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
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


def stable(text: str) -> str:
    """The dry run with what changes with every code edit or machine masked: the wheel's content
    hash, setup's fingerprint of it and the local folder it is shipped from (tests/launch/test_setup_exec.py
    and test_setup_real.py check them)."""
    text = re.sub(r"(\+|wheels/)[0-9a-f]{12}", r"\1<content-hash>", text)
    text = re.sub(r"SUPERVISE_SETUP_KEY=[0-9a-f]{16}", "SUPERVISE_SETUP_KEY=<fingerprint>", text)
    return text.replace(os.environ["SUPERVISE_HOME"], "<SUPERVISE_HOME>")


@pytest.mark.parametrize("recipe", RECIPES)
def test_dry_run_matches_golden_and_round_trips(monkeypatch, capsys, recipe):
    import sky

    text = dry_run(monkeypatch, capsys, "--spot", recipe)
    golden = GOLDEN / f"{recipe}.yaml"
    if os.environ.get("SUPERVISE_UPDATE_GOLDEN"):
        golden.write_text(stable(text))
    assert stable(text) == golden.read_text()

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
        # FAILOVER unless the recipe says otherwise: a recovery relaunches in place first
        # (sky/jobs/recovery_strategy.py, FailoverStrategyExecutor.recover); no region pinned
        # here, the bucket's location cannot be read without credentials
        assert rec["strategy"] == "FAILOVER"
        assert r.region is None
        assert r.disk_size == spec.resources.disk_size

    mount = task.storage_mounts["/checkpoints"]
    assert mount.source == "s3://my-ckpts"  # a bucket root: SkyPilot rejects s3://bucket/prefix for mounts
    assert mount.mode.value == "MOUNT_CACHED"
    (wheel_dir,) = [src for dst, src in task.file_mounts.items() if dst == "~/.supervise/wheel"]
    (shipped,) = Path(wheel_dir).iterdir()  # a directory holding just the wheel setup installs
    assert f'"$HOME/.supervise/wheel/{shipped.name}"' in task.setup

    assert SECRET not in text
    assert "HF_TOKEN" not in (task.envs or {})
    if "HF_TOKEN" in spec.secrets:
        assert config["secrets"] == {"HF_TOKEN": "<redacted>"}

    assert task.run.splitlines()[-1].startswith(f"supervise node --checkpoints {spec.checkpoints_url}")
    assert "exec " not in task.run and "set -e" not in task.run  # SkyPilot's flush must run after it
    assert f"--checkpoint-mount /checkpoints/supervise/{spec.name}" in task.run  # the prefix, under the root
    assert f"--config {spec.model.config}" in task.run
    assert "supervise_pip torch==" in task.setup and "--python 3.11" in task.setup
    assert "supervise==" not in task.setup and "supervise-titan==" not in task.setup  # never a PyPI lookup


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
    # S3 only on the node: the all-services variable would also redirect STS and every other AWS API
    assert config["envs"]["AWS_ENDPOINT_URL_S3"] == "https://acct.r2.cloudflarestorage.com"
    assert "AWS_ENDPOINT_URL" not in config["envs"]
    assert config["file_mounts"]["/checkpoints"]["source"] == "r2://my-r2"
    assert "--checkpoint-mount /checkpoints/runs/llama3-8b" in config["run"]
    assert "--checkpoints s3://my-r2/runs/llama3-8b" in config["run"]


def test_s3_endpoint_reaches_s3fs_through_the_s3_only_variable(s3_store, s3_url, monkeypatch):
    """What the node gets (AWS_ENDPOINT_URL_S3, no AWS_ENDPOINT_URL) is enough for the catalog (s3fs/botocore)."""
    from supervisor.store.fs import Store

    endpoint = os.environ.pop("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    store = Store(s3_url)
    store.put(b"x", "probe")
    assert store.cat("probe") == b"x"


@pytest.mark.parametrize("forward", [False, True])
def test_short_lived_session_keys_stay_home_unless_asked(monkeypatch, capsys, forward):
    for key, value in {"AWS_ACCESS_KEY_ID": "ASIA_SENTINEL", "AWS_SECRET_ACCESS_KEY": "s",
                       "AWS_SESSION_TOKEN": "token_sentinel"}.items():
        monkeypatch.setenv(key, value)
    sets = ["--set", "forward_aws_session=true"] if forward else []
    config = yaml.safe_load(dry_run(monkeypatch, capsys, "llama3_8b", *sets))
    aws = {k for k in config.get("secrets", {}) if k.startswith("AWS_")}
    assert aws == ({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} if forward else set())


def test_direct_mode_writes_to_the_bucket_without_a_mount(monkeypatch, capsys):
    import sky

    text = dry_run(monkeypatch, capsys, "llama3_debug", "--set", "checkpoint.mode=DIRECT", "--infra", "slurm")
    task = sky.Task.from_yaml_config(yaml.safe_load(text))
    assert not task.storage_mounts and list(task.file_mounts) == ["~/.supervise/wheel"]
    assert "--checkpoints s3://my-ckpts/supervise/llama3-debug --" in task.run
    assert all(str(r.cloud).lower() == "slurm" for r in task.resources)


def test_set_value_with_shell_metacharacters_is_quoted_in_run(monkeypatch, capsys, tmp_path):
    """Execute the rendered run script with a stand-in `supervise` that records its argv."""
    nasty = "it's; $(touch PWNED) `touch PWNED2` \"q\" | & > out < in * ~ \\ $HOME"
    text = dry_run(monkeypatch, capsys, "llama3_8b", "--set", f"overrides.comm.save_traces_folder={nasty}",
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
    assert argv[argv.index("--comm.save_traces_folder") + 1] == nasty
    assert sorted(p.name for p in work.iterdir()) == ["argv.json"]  # nothing ran, nothing redirected


def test_run_exit_code_is_the_wrappers_and_skypilots_flush_still_runs(monkeypatch, capsys, tmp_path):
    """`run` as SkyPilot executes it: our script + its MOUNT_CACHED flush appended (the installed
    TaskCodeGen.build_task_bash_script). The stand-in `supervise` exits 75 (preempted, saved); a
    stand-in `findmnt` (the flush's first command) records that the flush ran."""
    from sky.backends.task_codegen import TaskCodeGen

    run = yaml.safe_load(dry_run(monkeypatch, capsys, "llama3_debug"))["run"]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "supervise").write_text("#!/bin/sh\nexit 75\n")
    (bindir / "findmnt").write_text(f"#!/bin/sh\ntouch {tmp_path}/flushed\n")
    for exe in ("supervise", "findmnt"):
        (bindir / exe).chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    script = TaskCodeGen.build_task_bash_script(run)
    assert subprocess.run(["bash", "-c", script], env=env, timeout=30).returncode == ExitCode.PREEMPTED_SAVED
    assert (tmp_path / "flushed").exists()


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


def test_status_asks_for_the_reason_and_restarts_a_stopped_controller(monkeypatch):
    """The SDK boundary is replaced (no API server runs here): the first queue call finds the
    jobs controller stopped, as after its autostop; the second asks SkyPilot to start it."""
    import sky
    from sky import exceptions

    calls = []

    def queue_v2(**kw):
        calls.append(kw)
        if not kw["refresh"]:
            raise exceptions.ClusterNotUpError("jobs controller is stopped", cluster_status=None)
        return ([{"job_id": 3, "job_name": "run-a", "status": "FAILED_SETUP", "recovery_count": 0,
                  "failure_reason": "setup failed: pip exited 1"}], 1, {}, 1)

    monkeypatch.setattr(sky.jobs, "queue_v2", queue_v2)
    monkeypatch.setattr(sky, "stream_and_get", lambda request: request)
    (st,) = skypilot.SkyPilotBackend().status("run-a")
    assert st.reason == "setup failed: pip exited 1" and st.state == "FAILED_SETUP"
    assert [c["refresh"] for c in calls] == [False, True]
    assert all("failure_reason" in c["fields"] for c in calls)  # queue_v2's default fields drop it


def test_queue_fields_are_ones_skypilots_jobs_queue_serves():
    """Checked against the installed SkyPilot: every field we ask queue_v2 for is a
    ManagedJobRecord field, and the jobs server maps each to a database column or
    computes it (`details`: sky/jobs/utils.py, _update_fields then _format_job_details)."""
    from sky.jobs import state, utils
    from sky.schemas.api.responses import ManagedJobRecord

    assert set(skypilot.QUEUE_FIELDS) <= set(ManagedJobRecord.model_fields)
    db_fields, _handle = utils._update_fields(list(skypilot.QUEUE_FIELDS))
    assert "details" not in db_fields and "schedule_state" in db_fields  # computed from these
    for name in db_fields:
        state._map_response_field_to_db_column(name)  # raises ValueError for an unknown field


def test_status_shows_skypilots_details_of_a_job_that_is_not_running(monkeypatch, capsys):
    """A job stuck in STARTING without spot quota: SkyPilot has no failure_reason, only
    `details`. The SDK boundary is replaced (no API server runs here)."""
    import sky

    waiting = "In backoff, waiting for resources - Failed to acquire resources in all zones in us-east-1 for {8x H100 spot}"
    seen = []

    def queue_v2(**kw):
        seen.append(kw["fields"])
        return ([{"job_id": 4, "job_name": "run-q", "status": "STARTING", "recovery_count": 0,
                  "failure_reason": None, "details": waiting}], 1, {}, 1)

    monkeypatch.setattr(sky.jobs, "queue_v2", queue_v2)
    monkeypatch.setattr(sky, "stream_and_get", lambda request: request)
    registry.record("run-q", backend="skypilot", checkpoints_url=None, job_id="4")
    assert _cli(monkeypatch, "status", "run-q", "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["details"] == waiting and row["state"] == "STARTING" and row["reason"] is None
    assert "details" in seen[0]
    monkeypatch.setenv("COLUMNS", "400")
    assert _cli(monkeypatch, "status", "run-q") == 0
    assert "In backoff, waiting for resources" in capsys.readouterr().out


def test_reason_column_adds_what_the_nodes_recorded():
    from supervisor.launch.base import shown_reason

    gave_up = "gave up: 3 restarts without a new checkpoint; last error: torchrun failed (exit 1): FileNotFoundError: x"
    sky_reason = "Job failed with exit code 78 (user program failure)."
    assert shown_reason(sky_reason, "Failure: ...", {"gave_up": gave_up}) == f"{sky_reason}; node: {gave_up}"
    assert shown_reason(None, "In backoff, waiting for resources", None) == "In backoff, waiting for resources"
    assert shown_reason(None, None, {"gave_up": None, "last_error": "torchrun failed"}) == "torchrun failed"
    local = f"gave up; exit 78: {gave_up}"  # the local backend quotes the node's last line already
    assert shown_reason(local, None, {"gave_up": gave_up}) == local
    assert shown_reason(None, None, None) == ""


def test_disk_and_network_tiers_pass_through_from_set_and_recipe(monkeypatch, capsys, tmp_path):
    import sky
    from sky.utils.resources_utils import DiskTier, NetworkTier

    text = dry_run(monkeypatch, capsys, "llama3_8b", "--set", "resources.disk_tier=HIGH",
                   "--set", "resources.network_tier=best")
    task = sky.Task.from_yaml_config(yaml.safe_load(text))  # SkyPilot's own validation
    assert {(r.disk_tier, r.network_tier) for r in task.resources} == {(DiskTier.HIGH, NetworkTier.BEST)}

    recipe = yaml.safe_load((RECIPES_DIR / "llama3_8b.yaml").read_text())
    recipe["resources"].update(disk_tier="ultra", network_tier="standard")
    path = tmp_path / "tiers.yaml"
    path.write_text(yaml.safe_dump(recipe))
    config = yaml.safe_load(dry_run(monkeypatch, capsys, str(path)))
    assert {(r["disk_tier"], r["network_tier"]) for r in config["resources"]["any_of"]} == {("ultra", "standard")}


@pytest.mark.parametrize("key,enum", [("disk_tier", "DiskTier"), ("network_tier", "NetworkTier")])
def test_a_tier_skypilot_does_not_know_is_refused_with_its_values(monkeypatch, capsys, key, enum):
    from sky.utils import resources_utils

    monkeypatch.setattr(sys, "argv", ["supervise", "start", "llama3_8b", "--set", f"resources.{key}=fastest", "--dry-run"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code != 0 and f"resources.{key}" in err and "'fastest'" in err
    assert ", ".join(t.value for t in getattr(resources_utils, enum)) in err  # SkyPilot's values, not a copy


def test_rejected_field_names_the_tier_skypilot_complains_about():
    assert skypilot.rejected_field("Disk tier ultra is not supported for instance type None.") == "resources.disk_tier"
    assert skypilot.rejected_field("Invalid network_tier 'x'.") == "resources.network_tier"
    assert skypilot.rejected_field("Invalid infra to parse: foo") == "resources.infra"
    assert skypilot.rejected_field("Invalid memory 12Q") == "resources"


# ---- near the bucket (launch.placement) ------------------------------------------------

EU = "eu-central-1"
_LOCATION_XML = (b'<?xml version="1.0" encoding="UTF-8"?>\n<LocationConstraint xmlns="http://s3.amazonaws.com/doc/'
                 b'2006-03-01/">' + EU.encode() + b'</LocationConstraint>')
LOCATION_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(_LOCATION_XML), _LOCATION_XML))


@pytest.fixture
def aws_bucket_in_eu(s3_store, s3_env, monkeypatch):
    """Stands in for an AWS S3 bucket in eu-central-1, which this machine cannot reach:
    SeaweedFS serves the bucket, but answers every GetBucketLocation with an empty
    LocationConstraint (us-east-1), whatever the bucket was created with (tried with
    CreateBucketConfiguration eu-west-1). So a loopback proxy in front of it answers
    only `GET /<bucket>?location` as AWS does for a bucket in eu-central-1 and forwards
    everything else; and the proxy's loopback host counts as an AWS S3 host (AWS's are
    *.amazonaws.com), which is the one thing set in our code."""
    from supervisor.launch import placement
    from tests.store.tcp_proxy import FaultProxy

    proxy = FaultProxy(s3_store.ports["s3"])
    proxy.answer(rb"^GET /[^/?]+\?location[ &]", LOCATION_ANSWER)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("SUPERVISE_BUCKET", s3_store.url("runs"))
    monkeypatch.setattr(placement, "AWS_S3_HOST_SUFFIXES", (*placement.AWS_S3_HOST_SUFFIXES, "127.0.0.1"))
    yield proxy
    proxy.close()


def _dry_run_both(monkeypatch, capsys, *args) -> tuple[dict, str]:
    monkeypatch.setattr(sys, "argv", ["supervise", "start", *args, "--dry-run"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    assert (exc.value.code or 0) == 0, out.err
    return yaml.safe_load(out.out), out.err


def _placed(config: dict) -> set[tuple]:
    import sky

    task = sky.Task.from_yaml_config(copy.deepcopy(config))  # SkyPilot's own validation
    return {(str(r.cloud).lower() if r.cloud else None, r.region, r.job_recovery["strategy"]) for r in task.resources}


def test_failover_pinned_to_the_buckets_region(monkeypatch, capsys, aws_bucket_in_eu):
    config, err = _dry_run_both(monkeypatch, capsys, "--spot", "llama3_8b", "--set", "checkpoint.mode=DIRECT")
    assert _placed(config) == {("aws", EU, "FAILOVER")}
    assert {r["infra"] for r in config["resources"]["any_of"]} == {f"aws/{EU}"}  # SkyPilot's `infra: aws/<region>`
    assert any(line.startswith("GET /supervise?location") for line in aws_bucket_in_eu.seen)
    (line,) = [ln for ln in err.splitlines() if "pinned" in ln]
    assert f"aws/{EU}" in line and "s3://supervise/runs" in line
    rows = dict(skypilot.summary(build_spec("llama3_8b"), launch.dryrun(build_spec("llama3_8b", sets=[
        "checkpoint.mode=DIRECT"]), backend="skypilot")[1].placement))
    assert rows["infra"] == f"aws/{EU}" and rows["recovery"].startswith("FAILOVER")

    config, err = _dry_run_both(monkeypatch, capsys, "--spot", "llama3_8b", "--set", "checkpoint.mode=DIRECT",
                                "--infra", "aws")  # the cloud alone: the bucket's region is added
    assert _placed(config) == {("aws", EU, "FAILOVER")}


@pytest.mark.parametrize("how", [["--infra", "aws/us-west-2"], ["--set", "resources.infra=aws/us-west-2"]])
def test_an_explicit_other_region_is_kept_with_one_warning(monkeypatch, capsys, aws_bucket_in_eu, how):
    config, err = _dry_run_both(monkeypatch, capsys, "llama3_8b", "--set", "checkpoint.mode=DIRECT", *how)
    assert _placed(config) == {("aws", "us-west-2", "FAILOVER")}
    (warning,) = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert "aws/us-west-2" in warning and f"aws/{EU}" in warning and f"--infra aws/{EU}" in warning


def test_a_chosen_strategy_or_the_buckets_own_region_is_left_alone(monkeypatch, capsys, aws_bucket_in_eu):
    config, err = _dry_run_both(monkeypatch, capsys, "llama3_8b", "--set", "checkpoint.mode=DIRECT",
                                "--set", "recovery.strategy=EAGER_NEXT_REGION")
    assert _placed(config) == {(None, None, "EAGER_NEXT_REGION")}
    assert "recovery.strategy EAGER_NEXT_REGION is set" in err and "warning" not in err
    assert not any("?location" in line for line in aws_bucket_in_eu.seen)  # not even asked

    config, err = _dry_run_both(monkeypatch, capsys, "llama3_8b", "--set", "checkpoint.mode=DIRECT",
                                "--infra", f"aws/{EU}")
    assert _placed(config) == {("aws", EU, "FAILOVER")} and "warning" not in err


def test_no_pinning_when_the_location_cannot_be_read(monkeypatch, capsys):
    """Without credentials (the autouse fixture's environment): FAILOVER, no region, one line why."""
    config, err = _dry_run_both(monkeypatch, capsys, "llama3_8b")
    assert _placed(config) == {(None, None, "FAILOVER")}
    assert [ln for ln in err.splitlines() if "not pinned" in ln] == [
        "note: not pinned to the bucket's region: its location could not be read "
        "(NoCredentialsError: Unable to locate credentials)"]


def test_no_pinning_for_a_store_that_is_no_aws_s3(monkeypatch, capsys, s3_store, s3_env):
    """SeaweedFS at its loopback endpoint: no AWS region, whatever its GetBucketLocation says."""
    monkeypatch.setenv("SUPERVISE_BUCKET", s3_store.url("runs"))
    config, err = _dry_run_both(monkeypatch, capsys, "llama3_8b", "--set", "checkpoint.mode=DIRECT")
    assert _placed(config) == {(None, None, "FAILOVER")}
    assert "an S3-compatible store at 127.0.0.1, in no AWS region" in err


def test_a_gcs_bucket_pins_its_region(gcs_url, monkeypatch):
    """fake-gcs-server stands in for GCS: its buckets are `locationType: region`,
    `location: US-CENTRAL1` (it ignores a location asked for at creation)."""
    from supervisor.launch import placement

    assert placement.read_location(gcs_url, None) == placement.BucketLocation("gcp", "us-central1")


def test_placement_rules():
    from supervisor.launch.placement import BucketLocation, place

    eu = BucketLocation("aws", EU)
    b = "s3://b/runs"
    assert place(b, None, None, None, None, eu).infra == f"aws/{EU}"
    assert place(b, None, "aws", "aws", None, eu).infra == f"aws/{EU}"
    kept = place(b, None, "k8s/ctx", "kubernetes", "ctx", eu)  # a context is no region of the bucket's cloud
    assert (kept.infra, kept.strategy, kept.lines) == ("k8s/ctx", "FAILOVER", [])
    assert place(b, None, "slurm", "slurm", None, eu).infra == "slurm"
    assert place(b, None, "*/us-west-2", None, "us-west-2", eu).lines[0].startswith("warning:")
    assert place(b, "FAILOVER", None, None, None, None).infra is None
    gone = place(b, None, None, None, None, BucketLocation(why="no credentials"))
    assert (gone.infra, gone.strategy, gone.lines) == (None, "FAILOVER", ["note: not pinned to the bucket's region: no credentials"])


def test_location_answers_as_aws_words_them():
    from supervisor.launch.placement import gcs_region, is_aws_endpoint, s3_region

    assert [s3_region(c) for c in (None, "", "EU", "ap-south-1")] == ["us-east-1", "us-east-1", "eu-west-1", "ap-south-1"]
    assert gcs_region({"location": "EUROPE-WEST4", "locationType": "region"}) == "europe-west4"
    assert gcs_region({"location": "US", "locationType": "multi-region"}) is None
    assert is_aws_endpoint(None) and is_aws_endpoint("https://s3.eu-central-1.amazonaws.com")
    assert not is_aws_endpoint("https://acct.r2.cloudflarestorage.com")


def test_recovery_strategy_names_are_skypilots():
    """The strategies a recipe may name and the one rendered are those SkyPilot registers
    (sky/jobs/recovery_strategy.py: FAILOVER, EAGER_NEXT_REGION), read from the installed source."""
    import typing

    from sky.jobs import recovery_strategy  # noqa: F401 - registers the strategies
    from sky.utils import registry as sky_registry

    from supervisor.launch.placement import NEAR_BUCKET_STRATEGY
    from supervisor.spec import Recovery

    known = {name.upper() for name in sky_registry.JOBS_RECOVERY_STRATEGY_REGISTRY}
    ours = set(typing.get_args(typing.get_args(Recovery.model_fields["strategy"].annotation)[0]))
    assert ours | {NEAR_BUCKET_STRATEGY} <= known
