"""`start` proves the bucket and the Hub before anything is provisioned (issue 24).

The bucket is the real SeaweedFS S3 server (tests/fixtures_store.py); the Hub is
tests/fakehub.py, a stand-in for huggingface.co on loopback (this machine cannot
reach it), asked through the installed huggingface_hub's own `HfApi.auth_check`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest
from fsspec.registry import known_implementations
from packaging.requirements import Requirement

from supervisor import registry
from supervisor.launch import preflight
from supervisor.launch.local_controller import free_port
from supervisor.recipes import RECIPES_DIR, build_spec
from supervisor.spec import BUCKET_SCHEMES
from tests.fakehub import FakeHub

ROOT = Path(__file__).resolve().parents[2]
GATED = "meta-llama/Llama-3.1-8B"  # llama3_8b's tokenizer repo


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERVISE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SUPERVISE_STORE_READ_RETRY_S", raising=False)
    monkeypatch.setenv("SUPERVISE_STORE_RETRY_S", "120")  # the patient policy must not be the one that answers
    return tmp_path / "home"


@pytest.fixture
def hub(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    with FakeHub(GATED, folder, access={"hf_granted"}) as served:
        yield served


def _spec(bucket: str, *sets: str, recipe: str = "llama3_8b"):
    return build_spec(recipe, sets=[f"checkpoint.bucket={bucket}", *sets], name=f"pf-{uuid.uuid4().hex[:6]}")


def _nothing_launched(home: Path) -> bool:
    return not registry.all_jobs() and not (home / "local").exists()


# -- the bucket's scheme ---------------------------------------------------------------

def test_the_cloud_extra_installs_the_store_client_of_every_documented_scheme():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = {Requirement(r).name for r in project["dependencies"] + project["optional-dependencies"]["cloud"]}
    documented = set(re.findall(r"`([a-z0-9]+)://`", (ROOT / "docs" / "cloud.md").read_text()))
    assert documented <= set(BUCKET_SCHEMES), documented
    for scheme in BUCKET_SCHEMES:
        protocol = _spec(f"{scheme}://ckpts/runs").checkpoints_url.split("://")[0]  # r2/nebius are read as s3
        client = known_implementations[protocol]["class"].split(".")[0]
        assert client in installed, (scheme, client)


def test_start_names_the_package_a_scheme_needs_before_anything_else(home):
    """sys.modules['gcsfs'] = None stands in for a machine without gcsfs (import fails as it would)."""
    code = ("import sys; sys.modules['gcsfs'] = None\n"
            "from supervisor.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", code, "start", "--backend", "local", "--yes",
                           str(RECIPES_DIR / "llama3_debug.yaml"), "--set", "checkpoint.bucket=gs://ckpts/runs"],
                          env={**os.environ, "SUPERVISE_HOME": str(home)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and "gcsfs" in done.stderr, done.stderr
    assert "pip install 'supervise-titan[cloud]'" in done.stderr
    assert _nothing_launched(home)


# -- the bucket ------------------------------------------------------------------------

def test_a_reachable_writable_bucket_passes_and_keeps_nothing(s3_url, home):
    import fsspec

    line = preflight.check_bucket(s3_url)
    assert "conditional create enforced" in line
    assert not fsspec.filesystem("s3", skip_instance_cache=True).exists(f"{s3_url}/_canary")


def test_a_wrong_endpoint_fails_fast_naming_it(s3_url, home, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    start = time.monotonic()
    with pytest.raises(preflight.PreflightError) as err:
        preflight.check_bucket(s3_url)
    assert time.monotonic() - start < 60  # "in seconds": the patient policy alone would take 120 s
    line = str(err.value)
    assert "\n" not in line and endpoint in line and "AWS_ENDPOINT_URL" in line and "nothing was launched" in line


def test_a_missing_bucket_is_named(s3_store, s3_env, home):
    bucket = f"nosuch-{uuid.uuid4().hex[:8]}"
    with pytest.raises(preflight.PreflightError, match=f"bucket '{bucket}' does not exist.*create it"):
        preflight.check_bucket(f"s3://{bucket}/runs/x")  # SeaweedFS would create it on a write; nothing was written


def test_wrong_credentials_are_named(s3_url, home, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(preflight.PreflightError, match="access denied.*AWS_SECRET_ACCESS_KEY"):
        preflight.check_bucket(s3_url)


# -- the tokenizer repo ----------------------------------------------------------------

def test_a_token_with_access_reads_the_gated_repo(hub):
    spec = _spec("s3://ckpts/runs", f"envs.HF_ENDPOINT={hub.endpoint}")
    assert preflight.check_tokenizer(spec, {"HF_TOKEN": "hf_granted"}) == f"{GATED}: readable at {hub.endpoint} with HF_TOKEN"
    assert ("GET", f"/api/models/{GATED}/auth-check") in hub.requests


@pytest.mark.parametrize("environ, says", [
    ({"HF_TOKEN": "hf_someone_else"}, "HF_TOKEN has no access to the gated tokenizer repo"),
    ({}, "is gated and the job has no HF_TOKEN"),
])
def test_a_token_without_access_is_one_line(hub, environ, says):
    spec = _spec("s3://ckpts/runs", f"envs.HF_ENDPOINT={hub.endpoint}")
    with pytest.raises(preflight.PreflightError) as err:
        preflight.check_tokenizer(spec, environ)
    line = str(err.value)
    assert says in line and f"{hub.endpoint}/{GATED}" in line and "\n" not in line


def test_a_missing_repo_and_an_unreachable_hub_are_named(hub):
    spec = _spec("s3://ckpts/runs", f"envs.HF_ENDPOINT={hub.endpoint}", "tokenizer.hf_repo=someone/nothing-here")
    with pytest.raises(preflight.PreflightError, match="'someone/nothing-here' was not found at"):
        preflight.check_tokenizer(spec, {"HF_TOKEN": "hf_granted"})
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(preflight.PreflightError, match=f"cannot check tokenizer.hf_repo .* at {dead}.*HF_ENDPOINT"):
        preflight.check_tokenizer(_spec("s3://ckpts/runs", f"envs.HF_ENDPOINT={dead}"), {"HF_TOKEN": "hf_granted"})


def test_a_recipe_without_a_hub_tokenizer_asks_no_hub():
    assert preflight.check_tokenizer(_spec("s3://ckpts/runs", recipe="llama3_debug"), {}) is None


# -- through `supervise start` ---------------------------------------------------------

def _start(supervise, *sets: str):
    return supervise("start", "--backend", "local", "--yes", str(RECIPES_DIR / "llama3_debug.yaml"),
                     "--name", f"pf-{uuid.uuid4().hex[:6]}", "--num-nodes", "1", *(a for s in sets for a in ("--set", s)))


def test_start_with_a_wrong_endpoint_launches_nothing(s3_url, home, monkeypatch, supervise):
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    res = _start(supervise, f"checkpoint.bucket={s3_url}")
    assert res.returncode == 2, res
    assert res.stderr.count("\n") == 1 and endpoint in res.stderr and "nothing was launched" in res.stderr
    assert _nothing_launched(home)


def test_start_with_a_token_without_access_launches_nothing(s3_url, home, hub, monkeypatch, supervise):
    monkeypatch.setenv("HF_TOKEN", "hf_someone_else")
    res = _start(supervise, f"checkpoint.bucket={s3_url}", "tokenizer.tiny=false", f"tokenizer.hf_repo={GATED}",
                 "secrets=[HF_TOKEN]", f"envs.HF_ENDPOINT={hub.endpoint}")
    assert res.returncode == 2, res
    assert res.stderr.count("\n") == 1 and "HF_TOKEN has no access" in res.stderr, res.stderr
    assert "preflight" in res.stdout and "reachable, writable" in res.stdout  # the bucket passed first
    assert _nothing_launched(home)
