"""supervisor/titan_config.py: the one table of flags supervise owns, the one registry
reader, and TorchTitan's own parser (real TorchTitan 0.3.0 in a child process) as
`supervise start --dry-run` uses it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import titan_config as tc

TT = ["--module", "llama3", "--config", "llama3_debugmodel"]
SUPERVISE = str(Path(sys.executable).parent / "supervise")
BAD = [
    (["--training.stepz", "5"], "unknown option --training.stepz (did you mean --training.steps?)"),
    (["--checkpoint.interval", "-3"], "--checkpoint.interval -3: Checkpoint interval needs to be at least 1 step."),
    (["--training.steps", "abc"], "--training.steps abc: invalid literal for int() with base 10: 'abc'"),
]


def _box(title: str, *sections: list[str]) -> str:
    """The shape of tyro's error box (as TorchTitan's parser prints it)."""
    rows = []
    for i, section in enumerate(sections):
        if i:
            rows.append("│ " + "─" * 20 + " │")
        rows += [f"│ {line:<40} │" for line in section]
    return "\n".join([f"╭─ {title} ─╮", *rows, "╰───╯"])


def test_explain_names_the_flag():
    unknown = _box("Unrecognized options", ["Unrecognized options: --training.stepz, 5"],
                   ["Perhaps you meant:", "    --training.steps INT", "        How many"], ["For full helptext"])  # fmt: skip
    assert tc.explain(unknown, [*TT, "--training.stepz", "5"]) == BAD[0][1]
    section = _box("Value error", ["Error parsing checkpoint: Checkpoint interval needs to be at least 1 step."])
    assert tc.explain(section, [*TT, "--checkpoint.interval=-3"]) == BAD[1][1]
    assert tc.explain(section, [*TT, "--checkpoint.interval", "-3"]) == BAD[1][1]
    value = _box("Value error", ["Error parsing --training.steps: invalid literal for int() with base 10:", "'abc'"])
    assert tc.explain(value, [*TT, "--training.steps", "abc"]) == BAD[2][1]
    assert tc.explain("plain text\nlast line", TT) == "last line"


def test_one_owned_table_for_recipe_and_node():
    assert tc.owned_key("--checkpoint.keep-latest-k") == "checkpoint.keep_latest_k"
    assert tc.owned_key("--checkpoint.no-enable") == "checkpoint.enable"
    assert tc.owned_key("--checkpoint.no-interval") is None  # only booleans have a no- spelling
    assert tc.owned_key("--training.steps") is None
    args = [*TT, "--checkpoint.enable", "false", "--checkpoint.folder=/x", "--checkpoint.interval", "4"]
    assert tc.strip_node_owned(args) == [*TT, "--checkpoint.interval", "4"]  # interval is the recipe's, not the node's


def test_registry_reader_follows_torchtitan_lookup():
    assert "llama3_debugmodel" in tc.titan_configs("llama3")
    assert tc.titan_configs("llama3")["llama3_70b"].get("tensor_parallel_degree") in (None, 8)
    assert tc.registry_file("torchtitan.models.llama3") == tc.registry_file("llama3")  # fully qualified works too
    assert tc.model_problem("llama3", "llama3_8b") is None
    assert "unknown TorchTitan module" in tc.model_problem("llama9", "x")
    assert "unknown TorchTitan config" in tc.model_problem("llama3", "llama3_9b")


@pytest.mark.slow
def test_torchtitan_parser_verdicts_and_start_dry_run_exit_2():
    assert tc.check_args([*TT, "--training.steps", "5", "--metrics.log_freq", "1"]) is None
    for bad, words in BAD:
        assert tc.check_args([*TT, *bad]) == words
    env = {**os.environ, "SUPERVISE_BUCKET": "s3://my-ckpts"}
    for override, words in (("training.stepz=5", BAD[0][1]), ("training.steps=abc", BAD[2][1])):
        res = subprocess.run([SUPERVISE, "start", "--dry-run", "recipes/llama3_debug.yaml", "--set", f"overrides.{override}"],
                             capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
        assert res.returncode == 2 and res.stdout == "", res.stderr
        assert res.stderr.strip() == f"error: field 'overrides': TorchTitan rejects the trainer arguments: {words}"
