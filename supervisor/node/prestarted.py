"""`python -m supervisor.node.prestarted`: torchrun started before its command is
known. It imports torch.distributed.run (seconds: torch) while the wrapper still
asks the catalog what to resume, then reads the command from stdin and runs
torchrun's own `main` on it (the same code the `torchrun` script runs).

The standard library only before the clock starts: its timings, passed to the
ranks (ENV_TORCHRUN_TIMES, in the trainer's `trainer_ready` event), measure the
wrapper's share of a restart's critical path (benchmarks/node_bench.py).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    """One JSON line on stdin, {"argv": torchrun's args, "env": variables to add},
    then torchrun's `main`. End of input without a line: the wrapper decided not
    to run (exit 0). `waited_s`: how long torch was imported before the command came."""
    began = time.time()
    from torch.distributed.run import main as torchrun_main

    from supervisor.contract.runtime import ENV_TORCHRUN_TIMES

    imported = time.time()
    line = sys.stdin.readline()
    if not line:
        return 0
    order = json.loads(line)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the workers must not inherit the wrapper's pipe
    os.environ.update(order["env"])
    os.environ[ENV_TORCHRUN_TIMES] = json.dumps(
        {"started_at": round(began, 3), "import_s": round(imported - began, 3), "waited_s": round(time.time() - imported, 3)})
    sys.argv = ["torchrun", *order["argv"]]
    torchrun_main(order["argv"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
