"""A stand-in for supervisor.titan.train, for wrapper tests that need real
torchrun, real signals and real processes but not real training: it keeps the
runtime contract (heartbeats, notice.json -> outcome.json) and nothing else.
`--training.steps N` sets the length; the environment the rest, so that the args
stay ones TorchTitan's parser accepts (the wrapper checks them): STANDIN_STEP_S the
step time (default 0.1 s), STANDIN_EXIT a non-zero exit of every rank after the
last step instead of finishing (a crash, which the wrapper reports as 69)."""

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
    step_s = float(os.environ.get("STANDIN_STEP_S", "0.1"))
    (run_dir / f"pid-{rank}").write_text(str(os.getpid()))
    for step in range(1, steps + 1):
        time.sleep(step_s)
        write_json_atomic(run_dir / HEARTBEAT_DIR / f"rank-{rank}.json", {"rank": rank, "step": step, "time": time.time()})
        if (run_dir / NOTICE_FILE).exists():
            if rank == 0:
                write_json_atomic(run_dir / OUTCOME_FILE, {"outcome": "preempted_saved", "step": step, "reason": "notice"})
            return
    if os.environ.get("STANDIN_EXIT"):
        sys.exit(int(os.environ["STANDIN_EXIT"]))
    if rank == 0:
        write_json_atomic(run_dir / OUTCOME_FILE, {"outcome": "finished", "step": steps, "reason": ""})


if __name__ == "__main__":
    main()
