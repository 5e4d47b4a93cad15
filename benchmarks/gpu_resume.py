"""The real CUDA/NCCL path on a GPU machine: `supervise node` with the llama3 debug
model, an uninterrupted reference run, a preemption with notice (SIGTERM to the
wrapper) and one without (SIGKILL of every process), each restarted through
`supervise node`; final weights and per-step losses compared with the reference.

Checkpoints go to a local folder (file://), the catalog commits and verifies them.
Prints a summary and writes it to benchmarks/results/gpu_resume.json (or --out).

    python benchmarks/gpu_resume.py [--steps 40] [--interval 10] [--nproc 1]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from supervisor.store.catalog import Catalog  # noqa: E402
from supervisor.titan.results import load_tensors, read_losses, step_path, tensor_differences  # noqa: E402
from supervisor.titan.tinydata import build_assets, debug_model_args  # noqa: E402
from supervisor.titan.trainer_files import METRICS_FILE  # noqa: E402

SUPERVISE = [sys.executable, "-m", "supervisor"]


def last_step(dump: Path) -> int:
    try:
        lines = (dump / METRICS_FILE).read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def start_node(args: list[str], ckpt: str, nproc: int, log: Path) -> subprocess.Popen:
    cmd = [*SUPERVISE, "node", "--checkpoints", ckpt, "--nproc-per-node", str(nproc), "--", *args]
    return subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)


def kill_everything(proc: subprocess.Popen) -> None:
    """Like a VM vanishing: SIGKILL the wrapper and every descendant at once."""
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def run(args: list[str], ckpt: str, nproc: int, dump: Path, log: Path, *, interrupt=None, at_step=0) -> dict:
    """One job: start, optionally interrupt at `at_step`, restart until it finishes."""
    incarnations = []
    while True:
        t0 = time.monotonic()
        proc = start_node(args, ckpt, nproc, log)
        info = {"interrupted": None}
        if interrupt and not incarnations:
            while proc.poll() is None and last_step(dump) < at_step:
                time.sleep(0.2)
            info["interrupted_at_step"] = last_step(dump)
            t_int = time.monotonic()
            if interrupt == "notice":
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait()
                info["notice_to_exit_s"] = round(time.monotonic() - t_int, 2)
            else:
                kill_everything(proc)
            info["interrupted"] = interrupt
        code = proc.wait()
        info.update(exit_code=code, seconds=round(time.monotonic() - t0, 1), latest=Catalog(ckpt).latest().step)
        incarnations.append(info)
        if code == 0 or len(incarnations) > 3:
            return {"incarnations": incarnations}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_resume.json")
    opts = ap.parse_args()

    import torch

    root = Path(tempfile.mkdtemp(prefix="supervise-gpu-"))
    assets = build_assets(root / "assets")
    summary: dict = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "steps": opts.steps,
        "interval": opts.interval,
    }
    reference = None
    for name, interrupt, at in (
        ("reference", None, 0),
        ("notice", "notice", opts.steps // 2 + 3),
        ("no_notice", "kill", opts.steps // 2 + 3),
    ):
        dump = root / name
        ckpt = (root / name / "ckpt").as_uri()
        args = debug_model_args(assets, dump, steps=opts.steps, checkpoint_interval=opts.interval)
        log = root / f"{name}.log"
        result = run(args, ckpt, opts.nproc, dump, log, interrupt=interrupt, at_step=at)
        final = load_tensors(step_path(ckpt, opts.steps), model_only=False)
        losses = read_losses(dump)
        if reference is None:
            reference = (final, losses)
        else:
            result["weights_differ"] = tensor_differences(reference[0], final)[:5]
            result["weights_identical"] = not result["weights_differ"]
            result["losses_match"] = all(losses.get(s) == v for s, v in reference[1].items())
        result["log_tail"] = log.read_text().splitlines()[-6:]
        summary[name] = result
        print(json.dumps({name: result}, indent=2), flush=True)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
