"""Execute the rendered setup script, as SkyPilot runs it on a fresh node, with
stand-ins for what this machine cannot reach, and check the exact commands.

Stand-ins (each records its argv to $HOME/calls.jsonl):
- `~/.local/bin/uv` stands in for the uv that SkyPilot's runtime set-up installs
  there (sky/skylet/constants.py, SKY_UV_INSTALL_DIR). Real uv would download a
  CPython; this one only "has" the versions in $UV_STANDIN_PYTHONS and fails like
  uv for any other, so a 3.10 request on a 3.10-only image cannot pass.
- The venv's `bin/python` stands in for the CPython uv would fetch: it runs this
  machine's interpreter (3.11) with the venv's site folder first on sys.path
  (except `-m supervisor.ledger.mark`, setup's ledger write to the bucket:
  only recorded).
- The venv's `bin/pip` stands in for pip against PyPI (not reachable): a wheel
  given by path is really unpacked into the venv's site folder (so setup's checks
  import the shipped supervise); other requirements are only recorded (torch and
  TorchTitan come from this machine's environment).
- The venv's `bin/hf` stands in for the Hugging Face Hub CLI (no network): it
  parses its argv with the installed huggingface_hub CLI's own parser, then
  "downloads" what that CLI would select from a stand-in repo listing, using
  huggingface_hub's own pattern filter. With HF_ENDPOINT set it runs the real
  `hf` of this machine instead, against tests/fakehub.py (the hub stands in).
- The uv stand-in fails its first $UV_STANDIN_FAILURES calls as uv does when
  the Python download fails (python-build-standalone's host answering 503).
- tests/fakeindex.py stands in for PyPI for the real pip (retry tests).
"""

from __future__ import annotations

import json
import shlex
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from supervisor import DIST
from supervisor.launch import setup, wheel
from supervisor.recipes import build_spec

# The files of meta-llama/Llama-3.1-8B the hf stand-in "has" (names as on the hub).
REPO_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "original/tokenizer.model", "original/params.json", "model-00001-of-00004.safetensors"]

UV = """\
import json, os, pathlib, sys
home = pathlib.Path(os.environ["HOME"])
args = sys.argv[1:]
if args[0] == "pip":  # `uv pip install --link-mode copy --python VENV/bin/python ...`: recorded as the install
    assert args[1:5] == ["install", "--link-mode", "copy", "--python"], args
    venv = pathlib.Path(args[5]).parent.parent
    with open(home / "calls.jsonl", "a") as f:
        f.write(json.dumps({"exe": "pip", "argv": ["install", *args[6:]], "via": "uv"}) + "\\n")
    sys.path.insert(0, os.environ["STANDIN_DIR"])
    from standins import pip
    sys.exit(pip(venv, ["install", *args[6:]], record_it=False))
with open(home / "calls.jsonl", "a") as f:
    f.write(json.dumps({"exe": "uv", "argv": sys.argv[1:]}) + "\\n")
assert args[0] == "venv", args
failed = home / "uv-failures"
if len(failed.read_text() if failed.exists() else "") < int(os.environ.get("UV_STANDIN_FAILURES", "0")):
    failed.write_text(failed.read_text() + "x" if failed.exists() else "x")
    sys.exit("error: Failed to download https://github.com/astral-sh/python-build-standalone/releases/download/"
             "cpython-3.11-linux.tar.gz: HTTP status server error (503 Service Unavailable)")
version = args[args.index("--python") + 1]
if version not in os.environ.get("UV_STANDIN_PYTHONS", "").split():
    sys.exit(f"error: No interpreter found for Python {version} in managed installations or search path")
venv = pathlib.Path(os.path.expanduser(args[-1]))
sys.path.insert(0, os.environ["STANDIN_DIR"])
from standins import make_venv
make_venv(venv)
"""


def _write_exe(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


STANDINS = textwrap.dedent(f'''\
    """Stand-in venv executables (see tests/launch/test_setup_exec.py)."""
    import json, os, pathlib, sys, zipfile

    REPO_FILES = {REPO_FILES!r}

    def record(exe, argv):
        with open(pathlib.Path(os.environ["HOME"]) / "calls.jsonl", "a") as f:
            f.write(json.dumps({{"exe": exe, "argv": argv}}) + "\\n")

    def make_venv(venv):
        for exe in ("python", "pip", "hf"):
            path = venv / "bin" / exe
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"#!{sys.executable}\\nimport pathlib, sys; sys.path.insert(0, {{os.environ['STANDIN_DIR']!r}})\\n"
                            f"import standins; standins.{{exe}}(pathlib.Path({{str(venv)!r}}), sys.argv[1:])\\n")
            path.chmod(0o755)
        (venv / "site").mkdir()
        (venv / "bin" / "activate").write_text(f'PATH="{{venv}}/bin:$PATH"\\n')

    def python(venv, argv):
        record("python", argv)
        if argv[:2] == ["-m", "pip"]:
            return pip(venv, argv[2:], record_it=False)
        if argv[:2] == ["-m", "supervisor.ledger.mark"]:
            return  # the ledger write goes to the bucket (not here); tests/ledger covers mark itself
        env = dict(os.environ, PYTHONPATH=str(venv / "site"))
        os.execve(sys.executable, [sys.executable, *argv], env)

    def pip(venv, argv, record_it=True):
        if record_it:
            record("pip", argv)
        for arg in argv[1:]:
            if arg.endswith(".whl"):
                if not os.path.exists(arg):
                    sys.exit(f"ERROR: Could not install packages due to an OSError: [Errno 2] No such file or directory: {{arg!r}}")
                zipfile.ZipFile(arg).extractall(venv / "site")

    def hf(venv, argv):
        import click, typer
        if os.environ.get("HF_ENDPOINT"):  # the real hf CLI against tests/fakehub.py
            from huggingface_hub.cli.hf import main
            record("hf", argv)
            sys.argv = ["hf", *argv]
            try:
                main()
            except click.exceptions.Exit as done:  # this venv's typer 0.29 + click 8.1 let a clean exit escape
                sys.exit(done.exit_code)
            return
        from huggingface_hub.cli.hf import app
        from huggingface_hub.utils import filter_repo_objects
        record("hf", argv)
        group = typer.main.get_command(app)
        command = group.get_command(click.Context(group), argv[0])
        params = command.make_context(argv[0], argv[1:]).params  # the installed CLI's own parser
        if params["filenames"]:  # hf then fetches exactly these and ignores --include
            wanted = list(params["filenames"])
        else:
            wanted = list(filter_repo_objects(REPO_FILES, allow_patterns=params["include"],
                                              ignore_patterns=params["exclude"]))
        for name in wanted:
            out = pathlib.Path(params["local_dir"]) / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("stand-in " + name)
''')


def run_setup(tmp_path: Path, spec, *, pythons: str = "3.11", venv: str | None = None, ship: bool = True,
              env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, list[dict], Path, wheel.Wheel | None]:
    """Run the setup of `spec` in a scratch HOME; returns the process, the calls, the node dir, the wheel.
    Retries wait 0 s here (SUPERVISE_SETUP_RETRY_S) unless `env` says otherwise."""
    home = tmp_path / "home"
    standin_dir = tmp_path / "standins"
    standin_dir.mkdir(parents=True)
    (standin_dir / "standins.py").write_text(STANDINS)
    _write_exe(home / ".local" / "bin" / "uv", UV)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "STANDIN_DIR": str(standin_dir),
           "UV_STANDIN_PYTHONS": pythons, "SUPERVISE_HOME": os.environ["SUPERVISE_HOME"],
           "SUPERVISE_SETUP_RETRY_S": "0", "SUPERVISE_ENV_URL": "", **(env or {})}  # snapshots: test_setup_real.py
    built = setup.shipped_wheel(spec)
    script = setup.setup_script(spec, built)
    for remote, local in (setup.shipped_files(built) if ship else {}).items():  # what the file_mounts entry delivers
        target = home / remote.removeprefix("~/")
        target.mkdir(parents=True)
        for f in Path(local).iterdir():
            (target / f.name).write_bytes(f.read_bytes())
    if venv:  # a venv left by an earlier setup on this HOME
        subprocess.run([home / ".local" / "bin" / "uv", "venv", "--seed", "--python", pythons,
                        home / ".supervise" / "venv"], env=env, check=True, timeout=60)
        (home / "calls.jsonl").unlink()
        if venv == "healthy":
            import zipfile

            zipfile.ZipFile(built.directory / built.filename).extractall(home / ".supervise" / "venv" / "site")
    work = tmp_path / "node"
    work.mkdir()
    proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=180)
    calls_file = home / "calls.jsonl"
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()] if calls_file.exists() else []
    return proc, calls, work, built


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("SUPERVISE_BUCKET", "s3://my-ckpts/supervise")
    monkeypatch.setenv("SUPERVISE_HOME", str(tmp_path / "supervise-home"))


def _argvs(calls, exe):
    return [c["argv"] for c in calls if c["exe"] == exe]


def test_fresh_node_gets_python_3_11_the_shipped_wheel_and_the_tokenizer(tmp_path):
    spec = build_spec("llama3_8b", spot=True)
    proc, calls, work, built = run_setup(tmp_path, spec)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    home = tmp_path / "home"

    assert _argvs(calls, "uv") == [["venv", "--seed", "--python", "3.11", str(home / ".supervise" / "venv")]]
    pips = _argvs(calls, "pip")
    assert all(c.get("via") == "uv" for c in calls if c["exe"] == "pip")  # uv pip, where uv is
    assert pips[0][0] == "install" and pips[0][1].startswith("torch==")
    assert pips[1][:2] == ["install", pips[1][1]] and pips[1][1].startswith("torchtitan==")
    shipped = str(home / ".supervise" / "wheel" / built.filename)
    assert pips[1][-1] == shipped  # the wheel of this code, by path: never a PyPI lookup of our name
    assert not any(a.startswith(("supervise==", "supervise-titan==", DIST + "==")) or a in ("supervise", DIST)
                   for argv in pips for a in argv)
    assert built.filename == f"supervise_titan-{built.version}-py3-none-any.whl" and "+" in built.version

    (hf,) = _argvs(calls, "hf")
    assert hf[:4] == ["download", "meta-llama/Llama-3.1-8B", "--local-dir", spec.tokenizer.path]
    assert hf[4:] == ["--include", "tokenizer*", "--include", "special_tokens_map.json",
                      "--include", "original/tokenizer.model"]
    got = sorted(str(p.relative_to(work / spec.tokenizer.path)) for p in (work / spec.tokenizer.path).rglob("*")
                 if p.is_file())
    assert got == [".supervise-setup-key",  # setup's fingerprint: the next setup on this node reuses the folder
                   "original/tokenizer.model", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert "supervise setup: done in" in proc.stdout
    assert re.search(rf"supervise setup: {DIST} in \S+, Python 3\.1[1-9]\.", proc.stdout), proc.stdout  # (the stand-in's prefix)
    mark = [a for a in _argvs(calls, "python") if a[:2] == ["-m", "supervisor.ledger.mark"]]
    assert mark and mark[0][-1] == f"{spec.checkpoints_url}/_ledger" and mark[0][2] == "setup"


def test_hf_standin_rejects_the_old_multi_value_include(tmp_path):
    """The argv before this fix: huggingface_hub 1.x reads the extra values as file names and drops --include,
    so tokenizer.json never arrives (TorchTitan then crashes on every restart)."""
    spec = build_spec("llama3_8b", spot=True)
    old = ["download", "meta-llama/Llama-3.1-8B", "--local-dir", "tok",
           "--include", "tokenizer*", "special_tokens_map.json", "original/tokenizer.model"]
    standin_dir = tmp_path / "standins"
    standin_dir.mkdir()
    (standin_dir / "standins.py").write_text(STANDINS)
    home = tmp_path / "home"
    home.mkdir()
    code = (f"import sys, pathlib; sys.path.insert(0, {str(standin_dir)!r}); import standins; "
            f"standins.hf(pathlib.Path('.'), {old!r})")
    env = {**os.environ, "HOME": str(home), "STANDIN_DIR": str(standin_dir)}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=60)
    assert not (tmp_path / "tok" / "tokenizer.json").exists()
    assert (tmp_path / "tok" / "special_tokens_map.json").exists()
    assert spec.tokenizer.hf_repo  # the recipe that used to render that argv


def test_a_3_10_only_node_fails_setup_instead_of_running_a_broken_venv(tmp_path):
    proc, calls, _, _ = run_setup(tmp_path, build_spec("llama3_debug"), pythons="3.10")
    assert proc.returncode != 0
    assert "No interpreter found for Python 3.11" in proc.stderr
    assert not _argvs(calls, "pip")


def test_python_below_3_11_is_rejected_in_the_recipe():
    from supervisor.errors import SuperviseError

    with pytest.raises(SuperviseError, match="install.python.*3.11"):
        build_spec("llama3_debug", sets=["install.python=3.10"])


def test_debug_recipe_builds_its_tiny_assets_with_the_shipped_code(tmp_path):
    spec = build_spec("llama3_debug")
    proc, calls, work, _ = run_setup(tmp_path, spec)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (work / spec.tokenizer.path / "tokenizer.json").exists()
    assert (work / spec.dataset.path).exists()
    # the tiny build ran from the unpacked wheel, not this checkout
    site = tmp_path / "home" / ".supervise" / "venv" / "site"
    assert (site / "supervisor" / "titan" / "tinydata.py").exists()


def test_a_healthy_venv_is_reused_and_a_missing_wheel_or_a_foreign_supervisor_fails(tmp_path):
    spec = build_spec("llama3_debug")
    proc, calls, _, _ = run_setup(tmp_path / "reuse", spec, venv="healthy")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not _argvs(calls, "uv")  # the health check passed: no rebuild

    proc, calls, _, _ = run_setup(tmp_path / "nowheel", spec, ship=False)
    assert proc.returncode != 0 and "No such file or directory" in proc.stderr  # no mount, no install
    assert not any(c["exe"] == "hf" or c["argv"][:1] == ["-c"] and "build_assets" in c["argv"][1] for c in calls)


def test_a_foreign_supervisor_package_is_caught(tmp_path):
    """supervisord's `supervisor` package installed instead of ours: setup stops with one error line."""
    spec = build_spec("llama3_debug", sets=["install.supervise=supervisor==4.2.5"])
    proc, calls, _, _ = run_setup(tmp_path, spec)
    site = tmp_path / "home" / ".supervise" / "venv" / "site"
    assert _argvs(calls, "pip")[-1][-1] == "supervisor==4.2.5"  # --set install.supervise=<pip spec> is used as given
    assert setup.shipped_wheel(spec) is None  # and then nothing is shipped
    (foreign := site / "supervisor").mkdir()
    (foreign / "__init__.py").write_text("# supervisord\n")
    code = setup._ours_check(None)  # -S: no site-packages, so this checkout's editable install cannot answer
    out = subprocess.run([sys.executable, "-S", "-c", code], env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().startswith("supervise setup: error: import supervisor gives")
    assert len(out.stderr.strip().splitlines()) == 1


def test_the_wheel_is_reproducible_and_changes_with_the_code(tmp_path):
    files = wheel.package_files()
    a = wheel.wheel_bytes(files, version="0.1.0+x", meta="Metadata-Version: 2.1\nName: n\nVersion: 0\n", entry_points="")
    b = wheel.wheel_bytes(files, version="0.1.0+x", meta="Metadata-Version: 2.1\nName: n\nVersion: 0\n", entry_points="")
    assert a == b
    h1 = wheel.content_hash(files, "m", "e")
    changed = dict(files, **{"supervisor/__init__.py": files["supervisor/__init__.py"] + b"\n"})
    assert wheel.content_hash(changed, "m", "e") != h1
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in files)
    one = wheel.build(tmp_path)
    assert wheel.build(tmp_path) == one and [p.name for p in one.directory.iterdir()] == [one.filename]


# -- transient failures: retried, each retry named; permanent ones: one line, at once ---------------


def _retries(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("supervise setup: retry ")]


def _errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("supervise setup: error")]


def _hub_env(hub, tmp_path) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_UPDATE_CHECK": "1"}


def _hub_folder(tmp_path) -> Path:
    folder = tmp_path / "hub-repo"
    for name in REPO_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"hub {name}")
    return folder


def test_a_hub_that_fails_twice_is_retried_and_setup_succeeds(tmp_path):
    """The real `hf download` against a stand-in hub whose first two answers are 503
    (huggingface_hub 1.x's repo-info call does not retry a 5xx itself)."""
    from tests.fakehub import FakeHub

    spec = build_spec("llama3_8b", spot=True)
    with FakeHub(spec.tokenizer.hf_repo, _hub_folder(tmp_path)) as hub:
        hub.failures = [503, 503]
        proc, calls, work, _ = run_setup(tmp_path, spec, env=_hub_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    retries = _retries(proc)
    assert [r.split(" after: ")[0] for r in retries] == ["supervise setup: retry 2/5 of hf download",
                                                         "supervise setup: retry 3/5 of hf download"]
    assert "503 Service Unavailable" in retries[0]  # the step's last line says why
    assert len(_argvs(calls, "hf")) == 3
    assert (work / spec.tokenizer.path / "tokenizer.json").read_text() == "hub tokenizer.json"


def test_a_token_without_access_fails_at_once_with_one_line(tmp_path):
    """A gated repo and no token: the hub's 401 ends setup at once, one error line, one try."""
    from tests.fakehub import FakeHub

    spec = build_spec("llama3_8b", spot=True)
    with FakeHub(spec.tokenizer.hf_repo, _hub_folder(tmp_path), access={"hf_granted"}) as hub:
        proc, calls, _, _ = run_setup(tmp_path, spec, env=_hub_env(hub, tmp_path))
        served = list(hub.requests)
    assert proc.returncode != 0
    assert not _retries(proc) and len(_argvs(calls, "hf")) == 1 and len(served) == 1
    (error,) = _errors(proc)
    assert error.startswith("supervise setup: error: hf download failed (not retried): ")
    assert "Access denied" in error and "requires approval" in error
    assert proc.stderr.strip().splitlines()[-1] == error


def test_uv_s_python_download_is_retried(tmp_path):
    proc, calls, _, _ = run_setup(tmp_path, build_spec("llama3_debug"), env={"UV_STANDIN_FAILURES": "2"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r.split(" after: ")[0] for r in _retries(proc)] == [
        "supervise setup: retry 2/5 of uv venv (Python 3.11)", "supervise setup: retry 3/5 of uv venv (Python 3.11)"]
    assert len(_argvs(calls, "uv")) == 3


def _retry_pip(tmp_path, index, requirement: str, pip_retries: str = "0") -> subprocess.CompletedProcess:
    """setup's retry function around the real pip, against the stand-in index."""
    script = "\n".join([
        "set -euo pipefail", f"SUPERVISE_PERMANENT={shlex.quote(setup.PERMANENT)}", setup.RETRY_FUNCTION,
        shlex.join(["supervise_retry", "pip install probe", sys.executable, "-m", "pip", "install", "--no-cache-dir",
                    "--disable-pip-version-check", "--index-url", index.url, "--target", str(tmp_path / "site"),
                    requirement])])
    env = {**os.environ, "SUPERVISE_SETUP_RETRY_S": "0", "PIP_RETRIES": pip_retries,
           "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "", "PIP_CONFIG_FILE": os.devnull}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)


def test_an_index_that_fails_twice_is_retried_and_a_missing_package_is_not(tmp_path):
    """The real pip against a stand-in index. PIP_RETRIES=0 turns pip's own per-request
    retries off, so each 503 fails a pip run; pip then says "No matching distribution",
    as for a package that does not exist, and only its log tells the two apart."""
    from tests.fakeindex import FakeIndex, tiny_wheel

    (tmp_path / "wheels").mkdir()
    with FakeIndex(tmp_path / "index", [tiny_wheel(tmp_path / "wheels", "setup_probe", "1.0")]) as index:
        index.failures = [503, 503]
        proc = _retry_pip(tmp_path, index, "setup-probe==1.0")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert [r.split(" after: ")[0] for r in _retries(proc)] == [
            "supervise setup: retry 2/5 of pip install probe", "supervise setup: retry 3/5 of pip install probe"]
        assert (tmp_path / "site" / "setup_probe.py").exists()

        index.requests.clear()
        proc = _retry_pip(tmp_path, index, "setup-probe==2.0")
        assert proc.returncode != 0 and not _retries(proc)
        assert _errors(proc) == ["supervise setup: error: pip install probe failed (not retried): "
                                 "ERROR: No matching distribution found for setup-probe==2.0"]
        assert index.requests == ["/simple/setup-probe/"]


def test_every_network_step_goes_through_the_retry_function():
    script = setup.setup_script(build_spec("llama3_8b", spot=True), None)
    assert script.count("supervise_retry() {") == 1
    bare = [line for line in script.splitlines()
            if line.strip().startswith(("pip ", "python -m pip", "hf ", '"$uv" venv'))]
    assert not bare, f"network steps without retries: {bare}"
    assert sum(line.count("supervise_retry '") + line.count('supervise_retry "') for line in script.splitlines()) == 5


def test_the_permanent_patterns_are_the_tools_own_words():
    """Each hub message setup treats as permanent is one huggingface_hub's CLI prints
    (huggingface_hub/cli/_errors.py), and pip's as pip words them."""
    import huggingface_hub.cli._errors as hf_errors
    import pip._internal.commands.install as pip_install
    import pip._internal.network.download as pip_download
    import pip._internal.resolution.resolvelib.factory as pip_factory
    import inspect

    hf_source = inspect.getsource(hf_errors)
    for words in ("Access denied.", "not found.\" If the repo is private", "Revision not found in", "File not found in",
                  "Not logged in."):
        assert words.replace('"', "").split(" If")[0] in hf_source, words
    assert "No matching distribution found" in inspect.getsource(pip_factory)
    assert "HTTP error %s while getting" in inspect.getsource(pip_download)
    assert "due to an OSError" in inspect.getsource(pip_install)
