"""The `supervise` command. `supervise node` is on a restart's critical path:
its torchrun starts before the CLI is even imported (supervisor.node.early)."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["node"]:
        from supervisor.node import early

        early.prestart(sys.argv[2:])
    from supervisor.cli import main as cli_main

    cli_main()
