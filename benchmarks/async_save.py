"""Blocking time per checkpoint save: TorchTitan `async_mode async` vs a sync save
(issue 12), measured side by side in one run on this machine.

The same training (2 CPU ranks, gloo) runs twice under the supervised trainer,
once with sync saves and once with `--checkpoint.async_mode async`, for the
llama3 debug model (72 MB checkpoint) and for the same model 4 times as deep
(benchmarks/titan_configs.py, 258 MB); the trainer's `checkpoint_saved` ledger events carry how long each save
blocked the training loop (for async: the save call, any wait for the previous
upload, and the next optimizer step's wait for the background copy). The final save
is sync in both (TorchTitan's rule) and left out. Every periodic save must also
be committed by the background committer in both runs. Numbers are printed and
written to benchmarks/results/async_save.json.

    OMP_NUM_THREADS=1 python benchmarks/async_save.py [--steps 13] [--interval 3] [--models debug,x4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from supervisor.launch.local_controller import free_port  # noqa: E402
from supervisor.ledger.journal import read_events  # noqa: E402
from supervisor.store.catalog import Catalog  # noqa: E402
from supervisor.titan.tinydata import build_assets, debug_model_args  # noqa: E402

MODELS = {"debug": ("llama3", "llama3_debugmodel"), "x4": ("benchmarks.titan_configs", "llama3_debugmodel_x4")}


def run(root: Path, assets, model: str, mode: str, steps: int, interval: int) -> dict:
    root = root / model
    ckpt, ledger = root / mode / "ckpt", root / mode / "ledger"
    args = debug_model_args(assets, root / mode / "dump", steps=steps, checkpoint_interval=interval)
    args[args.index("--module") + 1], args[args.index("--config") + 1] = MODELS[model]
    args += ["--checkpoint.enable", "--checkpoint.folder", str(ckpt), "--checkpoint.keep_latest_k", "0"]
    if mode == "async":
        args += ["--checkpoint.async_mode", "async"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SUPERVISE_CHECKPOINTS": str(ckpt), "SUPERVISE_LEDGER": str(ledger),
           "SUPERVISE_RUN_DIR": str(root / mode / "run"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "supervisor.titan.train", *args]
    subprocess.run(cmd, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
    events, _ = read_events(str(ledger))
    blocked = {e.fields["step"]: e.fields["duration_s"] for e in events if e.kind == "checkpoint_saved"}
    periodic = [blocked[s] for s in sorted(blocked) if s != steps]
    states = {i.step: i.state for i in Catalog(str(ckpt)).list()}
    size = sum(f.stat().st_size for f in (ckpt / f"step-{steps}").iterdir() if f.is_file())
    return {"blocking_s": periodic, "mean_blocking_s": statistics.mean(periodic), "states": states,
            "checkpoint_bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=13)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--models", default="debug,x4", help=f"comma-separated, of {', '.join(MODELS)}")
    opts = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="supervise-async-bench-") as tmp:
        root = Path(tmp)
        assets = build_assets(root / "assets")
        for model in opts.models.split(","):
            runs = {mode: run(root, assets, model, mode, opts.steps, opts.interval) for mode in ("sync", "async")}
            ratio = runs["async"]["mean_blocking_s"] / runs["sync"]["mean_blocking_s"]
            results[model] = {**runs, "ratio_async_over_sync": ratio}
            print(f"{model} model, {runs['sync']['checkpoint_bytes'] / 2**20:.0f} MiB checkpoint:")
            for mode, r in runs.items():
                committed = sorted(s for s, st in r["states"].items() if st == "committed")
                print(f"  {mode:5s}: blocking per save {r['mean_blocking_s']:.3f} s "
                      f"(saves {r['blocking_s']}); committed {committed}")
            print(f"  async / sync blocking time: {ratio:.2f} (goal <= 0.10)")
    out = REPO / "benchmarks" / "results" / "async_save.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**results, "steps": opts.steps, "interval": opts.interval}, indent=1, default=str))


if __name__ == "__main__":
    main()
