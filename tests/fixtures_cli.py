"""Fixtures: `supervise` run in-process through its real entry point (owner: cli)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest


@pytest.fixture
def supervise(capsys, monkeypatch):
    """Run `supervise ARGS...` in-process through the real entry point (main: one-line errors, exit codes)."""
    from supervisor.cli import main

    def run(*args):
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["supervise", *args])
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run
