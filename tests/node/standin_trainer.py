"""A stand-in for supervisor.titan.train, for wrapper tests that need real
torchrun, real signals and real processes but not real training: it keeps the
runtime contract (heartbeats, notice.json -> outcome.json) and nothing else.
`--standin.step_s S` sets the step time; `--training.steps N` the length."""

import os
import sys
import time
from pathlib import Path

from supervisor.runtime import ENV_RUN_DIR, HEARTBEAT_DIR, NOTICE_FILE, OUTCOME_FILE, write_json_atomic


def _arg(name: str, default: str) -> str:
    args = sys.argv[1:]
    return args[args.index(name) + 1] if name in args else default


def main() -> None:
    run_dir = Path(os.environ[ENV_RUN_DIR])
    rank = int(os.environ["RANK"])
    steps = int(_arg("--training.steps", "1000"))
    step_s = float(_arg("--standin.step_s", "0.1"))
    (run_dir / f"pid-{rank}").write_text(str(os.getpid()))
    for step in range(1, steps + 1):
        time.sleep(step_s)
        write_json_atomic(run_dir / HEARTBEAT_DIR / f"rank-{rank}.json", {"rank": rank, "step": step, "time": time.time()})
        if (run_dir / NOTICE_FILE).exists():
            if rank == 0:
                write_json_atomic(run_dir / OUTCOME_FILE, {"outcome": "preempted_saved", "step": step, "reason": "notice"})
            return
    if rank == 0:
        write_json_atomic(run_dir / OUTCOME_FILE, {"outcome": "finished", "step": steps, "reason": ""})


if __name__ == "__main__":
    main()
