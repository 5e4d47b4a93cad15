"""Blocking time per checkpoint save: TorchTitan `async_mode async` vs a sync save
(issue 12), measured side by side in one run on this machine.

The same training (llama3 debug model, 2 CPU ranks, gloo) runs twice under the
supervised trainer, once with sync saves and once with `--checkpoint.async_mode
async`; the trainer's `checkpoint_saved` ledger events carry how long each save
blocked the training loop (for async: the save call, any wait for the previous
upload, and the next optimizer step's wait for the background copy). The final save
is sync in both (TorchTitan's rule) and left out. Every periodic save must also
be committed by the background committer in both runs. Numbers are printed and
written to benchmarks/results/async_save.json.

    OMP_NUM_THREADS=1 python benchmarks/async_save.py [--steps 13] [--interval 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from supervisor.ledger.journal import read_events  # noqa: E402
from supervisor.store.catalog import Catalog  # noqa: E402
from supervisor.titan.tinydata import build_assets, debug_model_args  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(root: Path, assets, mode: str, steps: int, interval: int) -> dict:
    ckpt, ledger = root / mode / "ckpt", root / mode / "ledger"
    args = [*debug_model_args(assets, root / mode / "dump", steps=steps, checkpoint_interval=interval),
            "--checkpoint.enable", "--checkpoint.folder", str(ckpt), "--checkpoint.keep_latest_k", "0"]
    if mode == "async":
        args += ["--checkpoint.async_mode", "async"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SUPERVISE_CHECKPOINTS": str(ckpt), "SUPERVISE_LEDGER": str(ledger),
           "SUPERVISE_RUN_DIR": str(root / mode / "run")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_port()), "-m", "supervisor.titan.train", *args]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
    events, _ = read_events(str(ledger))
    blocked = {e.fields["step"]: e.fields["duration_s"] for e in events if e.kind == "checkpoint_saved"}
    periodic = [blocked[s] for s in sorted(blocked) if s != steps]
    states = {i.step: i.state for i in Catalog(str(ckpt)).list()}
    return {"blocking_s": periodic, "mean_blocking_s": statistics.mean(periodic), "states": states}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=13)
    parser.add_argument("--interval", type=int, default=3)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="supervise-async-bench-") as tmp:
        root = Path(tmp)
        assets = build_assets(root / "assets")
        results = {mode: run(root, assets, mode, opts.steps, opts.interval) for mode in ("sync", "async")}
    ratio = results["async"]["mean_blocking_s"] / results["sync"]["mean_blocking_s"]
    for mode, r in results.items():
        committed = sorted(s for s, st in r["states"].items() if st == "committed")
        print(f"{mode:5s}: blocking per save {r['mean_blocking_s']:.3f} s (saves {r['blocking_s']}); committed {committed}")
    print(f"async / sync blocking time: {ratio:.2f} (goal <= 0.10)")
    out = REPO / "benchmarks" / "results" / "async_save.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**results, "ratio_async_over_sync": ratio, "steps": opts.steps,
                               "interval": opts.interval}, indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
