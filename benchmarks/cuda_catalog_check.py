"""The CUDA pieces of supervise without TorchTitan: an NCCL process group, a model
with dropout trained on the GPU, DCP saves committed by the catalog, a resume from
the catalog's latest step with the per-rank RNG state (CUDA generators included),
and a truncated newest checkpoint quarantined with fallback.

For GPU machines whose torch is older than TorchTitan 0.3.0 needs (it imports
`torch.distributed.fsdp.DataParallelMeshDims`); `gpu_resume.py` is the full path.

    torchrun --nproc-per-node 1 benchmarks/cuda_catalog_check.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from supervisor.store.catalog import Catalog  # noqa: E402
from supervisor.titan.rng import RngState  # noqa: E402

STEPS, SAVE_EVERY = 30, 10


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(2048, 512)
    ).cuda()


def state(model, opt, rng: RngState, step: int) -> dict:
    # get_state_dict materialises the optimizer's state even before its first
    # step, so a load fills exp_avg/exp_avg_sq instead of silently skipping them.
    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optimizer": optim_sd, "rng": rng.state_dict(), "step": step}


def train(ckpt: str, start_from: int | None, stop_at: int, timings: dict) -> tuple[dict, list[float]]:
    """Train to `stop_at`, saving + committing every SAVE_EVERY steps; inputs come
    from the CUDA RNG, so an exact resume needs its state back."""
    rank = dist.get_rank()
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = RngState(rank)
    torch.cuda.manual_seed(1234)
    step = 0
    if start_from is not None:
        loaded = state(model, opt, rng, 0)
        dcp.load(loaded, checkpoint_id=f"{ckpt}/step-{start_from}")
        set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
        rng.load_state_dict(loaded["rng"])
        step = start_from
    losses = []
    catalog = Catalog(ckpt)
    while step < stop_at:
        step += 1
        x = torch.randn(64, 512, device="cuda")
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % SAVE_EVERY == 0:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dcp.save(state(model, opt, rng, step), checkpoint_id=f"{ckpt}/step-{step}")
            t1 = time.perf_counter()
            dist.barrier()
            if rank == 0:
                catalog.commit(step, world_size=dist.get_world_size())
            dist.barrier()
            timings.setdefault("save_s", []).append(round(t1 - t0, 4))
            timings.setdefault("commit_s", []).append(round(time.perf_counter() - t1, 4))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cuda_catalog_check.json")
    opts = ap.parse_args()
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    root = Path(tempfile.mkdtemp(prefix="supervise-cuda-"))
    timings: dict = {}

    ref_weights, ref_losses = train(str(root / "ref"), None, STEPS, timings)
    run = str(root / "run")
    train(run, None, 25, timings)  # "preempted" after step 25: step 20 is the latest commit
    latest = Catalog(run).latest()
    weights, losses = train(run, latest.step, STEPS, timings)
    identical = all(torch.equal(ref_weights[k], weights[k]) for k in ref_weights)
    losses_match = losses == ref_losses[latest.step :]

    shard = sorted((root / "run" / f"step-{STEPS}").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    fallback = Catalog(run).latest()

    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "world_size": dist.get_world_size(),
        "resumed_from": latest.step,
        "weights_identical_after_resume": identical,
        "losses_match_after_resume": losses_match,
        "after_truncating_newest": {"latest": fallback.step, "skipped": fallback.skipped},
        "mean_save_s": sum(timings["save_s"]) / len(timings["save_s"]),
        "mean_commit_s": sum(timings["commit_s"]) / len(timings["commit_s"]),
    }
    if dist.get_rank() == 0:
        print(json.dumps(result, indent=2, default=str))
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(result, indent=2, default=str))
    dist.destroy_process_group()
    if not (identical and losses_match and fallback.step == 20):
        sys.exit(1)


if __name__ == "__main__":
    main()
