"""`python -m supervisor.ledger.mark setup --started-at EPOCH`: the setup script's ledger event.

Setup runs before `supervise` is installed on a fresh node, so it cannot write an
event when it begins. It records its start time in the shell (`date +%s.%N`) and
calls this once at its end; the event is `setup` with `duration_s` (like
checkpoint_saved, stamped at its end), the exit code so far, the node rank and
how the environment came to be (`--how`: reused = this node already had it,
restored = unpacked from the bucket's snapshot, installed = a full install) and, after a
full install, the last line of its snapshot publish (`--snapshot`: published, or why not).
Writer `setup-node<rank>`, incarnation `setup-<start>`; ledger from --ledger or
$SUPERVISE_LEDGER. Exit 0 even when the store is unreachable (a warning is
printed): a ledger problem must not fail a setup that worked; exit 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from supervisor.contract.runtime import ENV_LEDGER

HOWS = ("reused", "restored", "installed")  # the setup event's `how`, as the report labels it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor.ledger.mark", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["setup"])
    parser.add_argument("--started-at", type=float, required=True, help="UTC epoch seconds when setup began")
    parser.add_argument("--code", type=int, default=0, help="setup's exit status so far (0 = it worked)")
    parser.add_argument("--ledger", default=os.environ.get(ENV_LEDGER), help=f"ledger URL (default ${ENV_LEDGER})")
    parser.add_argument("--how", choices=HOWS, help="how setup got the environment (reused/restored/installed)")
    parser.add_argument("--snapshot", default="", help="the line its snapshot publish ended with (empty: none tried)")
    rank = os.environ.get("SKYPILOT_SETUP_NODE_RANK") or os.environ.get("SKYPILOT_NODE_RANK") or "0"  # as setup's
    parser.add_argument("--node-rank", type=int, default=int(rank))
    opts = parser.parse_args(argv)
    if not opts.ledger:
        parser.error(f"no ledger URL: pass --ledger or set {ENV_LEDGER}")
    duration = time.time() - opts.started_at
    if not 0 <= duration < 7 * 24 * 3600:
        parser.error(f"--started-at {opts.started_at} is not a recent UTC epoch time (use `date +%s.%N`)")
    from supervisor.ledger.journal import Journal

    journal = Journal(opts.ledger, writer=f"setup-node{opts.node_rank}", incarnation=f"setup-{opts.started_at:.0f}")
    journal.emit(opts.kind, duration_s=round(duration, 3), code=opts.code, node_rank=opts.node_rank, how=opts.how,
                 **({"snapshot": opts.snapshot} if opts.snapshot else {}))
    if journal.pending:
        print(f"warning: setup event not stored at {opts.ledger} (see the log above)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
