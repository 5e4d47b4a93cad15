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
  huggingface_hub's own pattern filter.
"""

from __future__ import annotations

import json
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
with open(home / "calls.jsonl", "a") as f:
    f.write(json.dumps({"exe": "uv", "argv": sys.argv[1:]}) + "\\n")
args = sys.argv[1:]
assert args[0] == "venv", args
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


def run_setup(tmp_path: Path, spec, *, pythons: str = "3.11", venv: str | None = None,
              ship: bool = True) -> tuple[subprocess.CompletedProcess, list[dict], Path, wheel.Wheel | None]:
    """Run the setup of `spec` in a scratch HOME; returns the process, the calls, the node dir, the wheel."""
    home = tmp_path / "home"
    standin_dir = tmp_path / "standins"
    standin_dir.mkdir(parents=True)
    (standin_dir / "standins.py").write_text(STANDINS)
    _write_exe(home / ".local" / "bin" / "uv", UV)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "STANDIN_DIR": str(standin_dir),
           "UV_STANDIN_PYTHONS": pythons, "SUPERVISE_HOME": os.environ["SUPERVISE_HOME"]}
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
    assert got == ["original/tokenizer.model", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
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
