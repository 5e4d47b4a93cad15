"""`supervise checkpoints ...` as a user runs it: exit codes, --json shapes, one-line errors."""

import json

import fsspec
import pytest

from tests.store.dcp_helpers import save

pytestmark = pytest.mark.slow


def test_list_latest_verify_commit_prune(s3_url, supervise):
    assert json.loads(supervise("checkpoints", "latest", s3_url, "--json").stdout) == {"step": None}
    for step in (1, 2, 3):
        save(s3_url, step)
    r = supervise("checkpoints", "list", s3_url, "--json")
    assert r.returncode == 0 and [(i["step"], i["state"]) for i in json.loads(r.stdout)] == [(s, "legacy") for s in (1, 2, 3)]
    for step in (1, 2):
        assert supervise("checkpoints", "commit", s3_url, "--step", str(step)).returncode == 0
    again = supervise("checkpoints", "commit", s3_url, "--step", "2")
    assert again.returncode == 1 and "already committed" in again.stderr

    fs, path = fsspec.core.url_to_fs(f"{s3_url}/step-3/__0_0.distcp", skip_instance_cache=True)
    fs.pipe_file(path, fs.cat_file(path)[:7])
    bad = supervise("checkpoints", "commit", s3_url, "--step", "3")
    assert bad.returncode == 1 and "truncated" in bad.stderr and "Traceback" not in bad.stderr
    assert supervise("checkpoints", "verify", s3_url, "--step", "3").returncode == 1
    assert supervise("checkpoints", "verify", s3_url, "--step", "2", "--deep").returncode == 0

    latest = supervise("checkpoints", "latest", s3_url, "--json")
    assert latest.returncode == 0
    assert json.loads(latest.stdout) == {"step": 2, "path": f"{s3_url}/step-2", "state": "committed"}

    dry = supervise("checkpoints", "prune", s3_url, "--keep", "1")
    assert dry.returncode == 0 and "would delete: step-1" in dry.stdout
    assert [i["step"] for i in json.loads(supervise("checkpoints", "list", s3_url, "--json").stdout)] == [1, 2, 3]
    assert supervise("checkpoints", "prune", s3_url, "--keep", "1", "--yes").returncode == 0
    states = {i["step"]: i["state"] for i in json.loads(supervise("checkpoints", "list", s3_url, "--json").stdout)}
    assert states == {2: "committed", 3: "incomplete"}
    human = supervise("checkpoints", "list", s3_url)
    assert human.returncode == 0 and "committed" in human.stdout


@pytest.mark.parametrize(
    "case",
    ["unknown scheme", "missing bucket", "wrong credentials", "url is an object", "url is a local file", "bad usage"],
)
def test_bad_input_is_one_line_no_traceback(case, s3_url, tmp_path, monkeypatch, supervise):
    monkeypatch.setenv("SUPERVISE_STORE_RETRY_S", "5")
    url = s3_url
    args = ["checkpoints", "latest"]
    if case == "unknown scheme":
        url = "nosuch://bucket/run"
    elif case == "missing bucket":
        url = "s3://no-such-bucket-here/run"
    elif case == "wrong credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    elif case == "url is an object":
        fs, path = fsspec.core.url_to_fs(s3_url, skip_instance_cache=True)
        fs.pipe_file(f"{path}/a-file", b"x")
        url = f"{s3_url}/a-file"
    elif case == "url is a local file":
        (tmp_path / "f").write_text("x")
        url = str(tmp_path / "f")
    elif case == "bad usage":
        args = ["checkpoints", "prune"]
    r = supervise(*args, url)
    assert r.returncode in (1, 2), r
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    if case != "bad usage":
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
