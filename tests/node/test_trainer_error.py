"""The trainer's own error line reaches the exit reason, the ledger's `exit` event,
the restart record's verdict and `status`'s REASON (issue 24: a missing tokenizer
ended in "gave up ... worker crash, NCCL/gloo or store error")."""

from __future__ import annotations

import json
import os
import time

import pytest

from supervisor.contract.exitcodes import ExitCode
from supervisor.node.torchrun import trainer_error
from supervisor.node.wrapper import exit_decision


def _record_with_torch(error_file, exc: BaseException, monkeypatch) -> None:
    """Write an error file as a rank under torchrun does: torch's own ErrorHandler
    (what `@record` on TorchTitan's Trainer.__init__/train calls)."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    error_file.parent.mkdir(parents=True)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    try:
        raise exc
    except type(exc) as err:
        ErrorHandler().record_exception(err)


def test_the_first_ranks_error_line_is_read_from_torchruns_error_files(tmp_path, monkeypatch):
    attempt = tmp_path / "torchrun" / "default_abc123" / "attempt_0"
    _record_with_torch(attempt / "1" / "error.json", RuntimeError("gloo: connection closed by peer"), monkeypatch)
    data = json.loads((attempt / "1" / "error.json").read_text())
    data["message"]["extraInfo"]["timestamp"] = str(int(data["message"]["extraInfo"]["timestamp"]) + 5)
    (attempt / "1" / "error.json").write_text(json.dumps(data))  # the later failure: a peer's consequence
    _record_with_torch(attempt / "0" / "error.json",
                       FileNotFoundError("tokenizer not found in /nope/tokenizer\nsee the docs"), monkeypatch)

    assert trainer_error(tmp_path / "torchrun") == "local rank 0: FileNotFoundError: tokenizer not found in /nope/tokenizer"
    assert trainer_error(tmp_path / "torchrun", since=time.time() + 60) is None  # an older run's files
    assert trainer_error(tmp_path / "nothing") is None


def test_exit_reason_names_the_error_when_torchrun_failed():
    line = "local rank 0: OSError: Can't load tokenizer for '/nope'"
    assert exit_decision(None, 1, None, None, line) == (ExitCode.RETRYABLE, f"torchrun failed (exit 1): {line}")
    assert exit_decision(None, 1, None, None)[1].endswith("worker crash, NCCL/gloo or store error")
    assert exit_decision({"outcome": "finished", "step": 3}, 0, None, None, line)[0] == ExitCode.FINISHED


@pytest.mark.slow
def test_a_missing_tokenizer_is_named_in_the_exit_ledger_record_and_status(tmp_path, s3_url, titan_args):
    """Real TorchTitan under `supervise node` (CPU, one rank) with an --hf_assets_path that
    does not exist: the 69's reason, the ledger's exit event and the next start's 78
    (K=1) all carry the trainer's exception line; status's REASON shows it."""
    from supervisor.launch.base import shown_reason
    from supervisor.ledger.journal import read_events
    from supervisor.node.budget import RestartRecord, streak_view
    from supervisor.contract.layout import ledger_url
    from supervisor.store.fs import Store
    from tests.node.nodeproc import start_node

    missing = tmp_path / "no-such-tokenizer"
    args = titan_args(tmp_path / "dump", steps=4, checkpoint_interval=2)
    args[args.index("--hf_assets_path") + 1] = str(missing)
    node = ["--checkpoints", s3_url, "--cloud", "none", "--max-restarts-without-progress", "1"]
    codes, logs = [], []
    for n in range(2):
        log = tmp_path / f"node{n}.log"
        proc = start_node([*node, "--run-dir", str(tmp_path / f"run{n}")], args, log=log)
        codes.append(proc.wait(300))
        logs.append(log.read_text(errors="replace"))
    assert codes == [ExitCode.RETRYABLE, ExitCode.USER_ERROR], logs

    exits = [e for e in read_events(ledger_url(s3_url))[0] if e.kind == "exit"]
    reason = exits[0].get("reason")
    assert reason.startswith("torchrun failed (exit 1): local rank 0: ") and str(missing) in reason, reason
    assert "worker crash" not in reason
    assert f"exit 69: {reason}" in logs[0]

    view = streak_view(RestartRecord(Store(s3_url)).load(), None)
    assert reason in view["gave_up"] and view["gave_up"].startswith("gave up: 1 restarts")
    assert reason in shown_reason("Job failed with exit code 78 (user program failure).", None, view)
    assert os.environ.get("PET_LOG_DIR") is None  # the wrapper set it for torchrun only
