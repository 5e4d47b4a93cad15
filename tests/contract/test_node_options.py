"""contract.node.NodeOptions is the node command's only owner: what the launcher
renders, the node reads back unchanged, and its typer command parses the same."""

from __future__ import annotations

import re
import subprocess
from dataclasses import fields, replace
from pathlib import Path

import pytest
import typer

from supervisor.contract.node import Auto, Direct, Mount, NodeOptions, flags
from supervisor.recipes import RECIPES_DIR, build_spec

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
ROOT = Path(__file__).resolve().parents[2]


def cli_parse(argv: list[str]) -> NodeOptions:
    """What `supervise node` itself builds from `argv` (its typer command, click's parser)."""
    from supervisor.node import cli

    app = typer.Typer()
    app.command("node", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(cli.node)
    app.command("other")(lambda: None)
    command = typer.main.get_command(app).commands["node"]
    ctx = command.make_context("node", argv[argv.index("node") + 1 :])
    params = {k: v for k, v in ctx.params.items() if k not in ("dry_run", "as_json")}
    urls = {c: params.pop(cli._url_param(c)) for c in cli.CLOUDS}
    return NodeOptions.from_params(params, metadata_urls={c: u for c, u in urls.items() if u},
                                   trainer_args=tuple(ctx.args), program=tuple(argv[: argv.index("node")]))


def round_trips(opts: NodeOptions) -> None:
    argv = opts.to_argv()
    assert NodeOptions.from_argv(argv) == opts, argv
    assert cli_parse(argv) == opts, argv


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("sets", [[], ["checkpoint.mode=direct", "checkpoint.interval=auto", "resources.procs_per_node=2"]])
def test_every_recipe_rendering_round_trips(recipe, sets, monkeypatch):
    from supervisor.launch.task import render

    monkeypatch.setenv("SUPERVISE_BUCKET", "s3://my-ckpts/supervise")
    round_trips(render(build_spec(recipe, sets=sets)).run)


def changed(name: str, value):
    """A value of field `name` other than its default."""
    return {"write": Mount("/checkpoints/r", 12.5), "interval": Auto(7, 70), "metadata_urls": {"aws": "http://127.0.0.1:9"},
            "program": ("/venv/bin/python", "-m", "supervisor"), "trainer_args": ("--module", "llama3", "--x=1")}.get(
        name, {str: "s3://b/x", int: 11, float: 0.125}.get(type(value)) if value is not None else None)


@pytest.mark.parametrize("name", [f.name for f in fields(NodeOptions)])
def test_every_option_round_trips(name):
    default = getattr(NodeOptions(), name)
    value = changed(name, default)
    if value is None:  # an optional str/int field
        value = 4 if name == "nproc_per_node" else "/tmp/x"
    opts = replace(NodeOptions(), **{name: value})
    assert opts != NodeOptions()
    round_trips(opts)


def test_write_modes_and_intervals_round_trip():
    for write in (Direct(), Mount("/m"), Mount("/m", 0.0)):
        for interval in (None, Auto(1, 1), Auto(50, 5000)):
            round_trips(NodeOptions(checkpoints="s3://b/r", write=write, interval=interval))


def test_an_unknown_option_is_named():
    with pytest.raises(ValueError, match="--bogus"):
        NodeOptions.from_argv(["supervise", "node", "--bogus", "1", "--"])


def test_every_flag_keeps_its_name():
    assert [f.name for f in flags()] == [
        "--checkpoints", "--max-restarts-without-progress", "--checkpoint-mount", "--commit-wait", "--keep",
        "--checkpoint-interval-auto", "--nproc-per-node", "--master-port", "--trainer-module", "--run-dir",
        "--notice-file", "--cloud", "--notice-poll", "--grace", "--hang-timeout", "--startup-timeout"]


# Code that edits a node command as text: inserting after "node", slicing in, swapping the program.
SPLICES = re.compile(r"""\.index\(["']node["']\)|argv\[\w*:\w*\]\s*=(?!=)|argv\[0\]\s*=(?!=)|argv\.insert\(|\[i:i\]""")


def test_no_code_splices_a_node_argv():
    files = subprocess.run(["git", "ls-files", "supervisor/*.py"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    hits = [f"{f}:{n}: {line.strip()}" for f in files for n, line in enumerate((ROOT / f).read_text().splitlines(), 1)
            if SPLICES.search(line)]
    assert not hits, hits
