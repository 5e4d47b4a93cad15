"""A stand-in for `supervise node` in backend tests: it speaks the node's
contract (SKYPILOT_* env, heartbeats in $SUPERVISE_RUN_DIR, exit codes, SIGTERM
= save and exit 75) without training, so the policy tests take seconds.

It "trains" by counting steps, "commits" a step every 3 steps to
$STANDIN_DIR/committed, resumes from there, and keeps one child process in its
own session (like a torchrun worker) so the kill-the-whole-tree paths are real.

    standin_node.py node [--master-port P] [--notice-file F] -- [--exit CODE] [--steps N] [--step-s S]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("node")
p.add_argument("--master-port", type=int, required=True)
p.add_argument("--notice-file", type=Path, required=True)
p.add_argument("--exit", type=int, default=None)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--step-s", type=float, default=0.15)
args, _node_options = p.parse_known_args([a for a in sys.argv[1:] if a != "--"])  # its own come as trainer args

rank = int(os.environ["SKYPILOT_NODE_RANK"])
state = Path(os.environ["STANDIN_DIR"])
run_dir = Path(os.environ["SUPERVISE_RUN_DIR"])
state.mkdir(parents=True, exist_ok=True)
with open(state / f"starts-{rank}.jsonl", "a") as f:
    keys = ["SKYPILOT_NUM_NODES", "SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_GPUS_PER_NODE",
            "SKYPILOT_TASK_ID", "SUPERVISE_INCARNATION"]
    f.write(json.dumps({"pid": os.getpid(), "port": args.master_port, **{k: os.environ.get(k) for k in keys}}) + "\n")
if args.exit is not None:
    sys.exit(args.exit)

worker = subprocess.Popen(
    [sys.executable, "-c", "import time\nwhile True: time.sleep(1)"],
    env={**os.environ, "RANK": str(rank), "LOCAL_RANK": "0"},
    start_new_session=True,
)
(state / f"worker-{rank}.pid").write_text(str(worker.pid))
committed_file = state / "committed"
step = int(committed_file.read_text()) if committed_file.exists() else 0
noticed = False


def on_term(signum, frame):
    global noticed
    noticed = True


signal.signal(signal.SIGTERM, on_term)


def commit(s):
    if rank == 0:
        tmp = state / ".committed.tmp"
        tmp.write_text(str(s))
        os.replace(tmp, committed_file)


while step < args.steps:
    time.sleep(args.step_s)
    step += 1
    hb = run_dir / "heartbeat" / f"rank-{rank}.json"
    hb.parent.mkdir(parents=True, exist_ok=True)
    tmp = hb.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rank": rank, "step": step, "time": time.time()}))
    os.replace(tmp, hb)
    if step % 3 == 0:
        commit(step)
    agreed = state / f"agree-{os.environ['SUPERVISE_INCARNATION']}"  # all ranks agree, like the trainer's collective
    if noticed or args.notice_file.exists() or agreed.exists():
        agreed.touch()
        commit(step)
        worker.kill()
        sys.exit(75)
commit(step)
worker.kill()
sys.exit(0)
