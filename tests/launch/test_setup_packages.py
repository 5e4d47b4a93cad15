"""Setup installs what the recipe's TorchTitan config imports, resolved from TorchTitan's
installed source (supervisor.titan_config.config_imports), never listed by hand."""

from __future__ import annotations

import logging
import shlex
import sys
import textwrap
from importlib import metadata

import pytest
from packaging.utils import canonicalize_name

from supervisor.launch import setup
from supervisor.recipes import RECIPES_DIR, build_spec
from supervisor.spec import titan_args
from supervisor.titan_config import TitanArgsCheck, config_imports, imports_of

BUNDLED = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("SUPERVISE_BUCKET", "s3://my-ckpts/supervise")
    monkeypatch.setenv("SUPERVISE_HOME", str(tmp_path / "supervise-home"))


def _pip_requirements(script: str) -> list[str]:
    """The requirements of every `pip install` line of a rendered setup (run through supervise_retry)."""
    reqs = []
    for line in script.splitlines():
        argv = shlex.split(line)
        if argv[:1] == ["supervise_retry"] and argv[2:3] == ["supervise_pip"]:  # pip install or uv pip install
            reqs += [a for a in argv[3:] if not a.startswith("-")]
    return reqs


@pytest.mark.parametrize("recipe", BUNDLED)
def test_every_bundled_recipe_installs_every_module_its_config_imports(recipe):
    spec = build_spec(recipe)
    installs = _pip_requirements(setup.setup_script(spec, None))
    installed = setup._closure(installs)  # the setup's requirements and, where installed here, theirs
    owners = metadata.packages_distributions()
    for module in config_imports(tuple(titan_args(spec))):
        dists = {canonicalize_name(d) for d in owners.get(module, [module])}
        assert dists & installed, f"{recipe}: its config imports {module}, which setup does not install"


def test_405b_gets_torchao_for_its_float8_converter_and_the_others_do_not(caplog):
    """TorchTitan's own parser on the 405B config cannot run here for want of torchao: the
    launcher says so and that the nodes check; the resolver finds it and setup installs a
    pinned one."""
    with caplog.at_level(logging.WARNING, logger="supervisor.spec"):
        spec = build_spec("llama3_405b")
    [said] = [r.getMessage() for r in caplog.records if "not checked before launch" in r.getMessage()]
    assert "before launch (ImportError: torchao is not installed." in said, said
    assert "each node checks them before it trains" in said, said
    assert "torchao" in config_imports(tuple(titan_args(spec)))
    torchao = [r for r in _pip_requirements(setup.setup_script(spec, None)) if r.startswith("torchao")]
    assert torchao == [f"torchao=={setup.KNOWN_GOOD['torchao']}"]
    for recipe in ("llama3_debug", "llama3_8b", "llama3_70b"):  # their registry imports float8.py too, but never runs it
        assert "torchao" not in config_imports(tuple(titan_args(build_spec(recipe))))


def test_the_torchao_pin_loads_with_the_torch_setup_installs():
    """torchao 0.18.0 loads its compiled kernels only with torch >= 2.11 (torchao/__init__.py,
    min_torch_version); setup installs the launching machine's torch."""
    torch = tuple(int(p) for p in setup._pinned("torch").split(".")[:2])
    assert setup.KNOWN_GOOD["torchao"] == "0.18.0" and torch >= (2, 11)


def test_a_converter_config_is_followed_into_its_converter():
    """llama3_8b_mxfp8 uses TorchTitan's MXFP8LinearConverter (components/quantization/mx.py)."""
    assert "torchao" in config_imports(("--module", "llama3", "--config", "llama3_8b_mxfp8"))
    assert "torchao" not in config_imports(("--module", "llama3", "--config", "llama3_8b"))


def test_a_package_the_recipe_installs_itself_is_not_added_twice():
    spec = build_spec("llama3_405b", sets=["install.extra=[torchao]"])
    reqs = _pip_requirements(setup.setup_script(spec, None))
    assert [r for r in reqs if r.startswith("torchao")] == ["torchao"]


def test_a_custom_module_s_own_imports_are_resolved(tmp_path, monkeypatch):
    """A user's `--module` package: the files whose code its config runs count (their lazy and
    guarded imports included); a file its registry merely imports does not."""
    pkg = tmp_path / "mymodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "fp8.py").write_text(textwrap.dedent("""\
        try:
            import not_needed_by_tiny
        except ImportError:
            pass


        def convert(config):
            return config
    """))
    (pkg / "data.py").write_text(textwrap.dedent("""\
        def prepare(config):
            try:
                import zstd_for_my_dataset
            except ImportError:
                pass
            return config
    """))
    (pkg / "config_registry.py").write_text(textwrap.dedent("""\
        from torchtitan.models.llama3.config_registry import llama3_debugmodel

        from mymodels import data, fp8


        def tiny():
            return data.prepare(llama3_debugmodel())
    """))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    child = TitanArgsCheck()  # a fresh child, so that it sees PYTHONPATH
    try:
        child.submit_imports(["--module", "mymodels", "--config", "tiny"])
        found = child.imports(120)
    finally:
        child.close()
    assert "zstd_for_my_dataset" in found
    assert "not_needed_by_tiny" not in found and "mymodels" not in found


def test_imports_of_reads_statements_anywhere_and_find_spec_literals(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(textwrap.dedent("""\
        import os, json.decoder
        from . import sibling
        from importlib.util import find_spec
        def f():
            from torchao.float8 import Float8LinearConfig
            if find_spec("triton") is None:
                import importlib; importlib.import_module("mslk.ops")
    """))
    assert imports_of(src) == {"os", "json", "importlib", "torchao", "triton", "mslk"}
    assert sys.stdlib_module_names >= {"os", "json", "importlib"}
