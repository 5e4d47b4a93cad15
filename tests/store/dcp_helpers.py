"""Real torch DCP saves of a small model into a catalog URL (1 rank in-process, 2 ranks with gloo).

`python -m tests.store.dcp_helpers URL STEP WORLD` saves with WORLD ranks
(torch.multiprocessing spawn, gloo on loopback), the way TorchTitan writes
`step-N/.metadata` + `__<rank>_0.distcp`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings


def _state(step: int, rank: int, extra_mb: int = 0):
    import torch

    torch.manual_seed(step)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 32))
    # A per-rank tensor so every rank's shard holds data (replicated ones are deduplicated).
    state = {"model": model.state_dict(), f"rank{rank}": torch.full((256,), float(rank + step))}
    if extra_mb:  # a shard big enough for multipart uploads
        state["big"] = torch.rand(extra_mb * 2**18)
    return state


def save(url: str, step: int, extra_mb: int = 0, hashed: bool = False) -> str:
    """One writer, no process group: DCP writes straight to s3:// or a path through fsspec.
    `hashed`: through the supervised trainer's writer (supervisor.titan.hashing), which
    leaves the writers' record; else plain DCP, as plain TorchTitan writes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    import fsspec

    from supervisor.titan.hashing import HashingFsspecWriter

    # DCP opens the URL with fsspec's cached instance: drop it so the current AWS_* env applies.
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    path = f"{url}/step-{step}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer = (HashingFsspecWriter if hashed else FsspecWriter)(path, sync_files=False)
        dcp.save(_state(step, 0, extra_mb), storage_writer=writer)
    return path


def save_ranks(url: str, step: int, world: int = 2) -> str:
    """Each rank its own process (spawned in a child interpreter so the test process stays clean)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "tests.store.dcp_helpers", url, str(step), str(world)], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), timeout=120)  # fmt: skip
    return f"{url}/step-{step}"


def _rank(rank: int, world: int, port: int, url: str, step: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dcp.save(_state(step, rank), storage_writer=FsspecWriter(f"{url}/step-{step}", sync_files=False))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    url, step, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(world, port, url, step), nprocs=world, join=True)
