"""SkyPilot's environment -> the torchrun argv, built the way SkyPilot's own
TorchTitan example (examples/training/torchtitan/torchtitan.yaml) builds it:

    torchrun --nnodes $SKYPILOT_NUM_NODES --nproc_per_node $SKYPILOT_NUM_GPUS_PER_NODE
             --node_rank $SKYPILOT_NODE_RANK --master_addr=<first line of SKYPILOT_NODE_IPS>
             --master_port=8008 -m <trainer module> <trainer args>

Pure functions of the environment, so they are tested without processes.

The torchrun the wrapper starts before its command is known: supervisor.node.prestarted.
"""

from __future__ import annotations

import glob
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from supervisor.errors import SuperviseError
from supervisor.exitcodes import ExitCode

DEFAULT_MASTER_PORT = 8008  # the port SkyPilot's TorchTitan example uses
DEFAULT_TRAINER_MODULE = "supervisor.titan.train"


@dataclass(frozen=True)
class Topology:
    nnodes: int
    nproc_per_node: int
    node_rank: int
    master_addr: str
    master_port: int
    accelerator: str  # "gpu" or "cpu" (TorchTitan then talks gloo)

    def as_dict(self) -> dict:
        return asdict(self)


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SuperviseError(f"{name}={raw!r} is not an integer", ExitCode.USER_ERROR) from None


def local_gpu_count() -> int:
    """GPUs visible on this node, without importing torch (which costs seconds)."""
    return len(glob.glob("/dev/nvidia[0-9]*"))


def topology_from_env(
    env: Mapping[str, str],
    *,
    nproc_per_node: int | None = None,
    master_port: int = DEFAULT_MASTER_PORT,
    gpus: int | None = None,
) -> Topology:
    """Read SKYPILOT_* (single-node defaults when absent) and check it is coherent."""
    nnodes = _int_env(env, "SKYPILOT_NUM_NODES", 1)
    node_rank = _int_env(env, "SKYPILOT_NODE_RANK", 0)
    gpus = local_gpu_count() if gpus is None else gpus
    sky_gpus = _int_env(env, "SKYPILOT_NUM_GPUS_PER_NODE", 0)
    accelerator = "gpu" if gpus else "cpu"  # CPU-only nodes run several gloo ranks
    if nproc_per_node is None:
        nproc_per_node = sky_gpus or gpus or 1
    ips = [line.strip() for line in env.get("SKYPILOT_NODE_IPS", "").splitlines() if line.strip()]

    if nnodes < 1:
        raise SuperviseError(f"SKYPILOT_NUM_NODES={nnodes} must be at least 1", ExitCode.USER_ERROR)
    if not 0 <= node_rank < nnodes:
        raise SuperviseError(
            f"node rank {node_rank} is out of range for {nnodes} node(s) (SKYPILOT_NODE_RANK must be 0..{nnodes - 1})",
            ExitCode.USER_ERROR,
        )
    if nproc_per_node < 1:
        raise SuperviseError(f"--nproc-per-node {nproc_per_node} must be at least 1", ExitCode.USER_ERROR)
    if nnodes > 1 and not ips:
        raise SuperviseError(
            f"SKYPILOT_NUM_NODES={nnodes} but SKYPILOT_NODE_IPS is empty: cannot find the head node",
            ExitCode.USER_ERROR,
        )
    if ips and len(ips) < nnodes:
        raise SuperviseError(
            f"SKYPILOT_NODE_IPS lists {len(ips)} address(es) for SKYPILOT_NUM_NODES={nnodes}",
            ExitCode.USER_ERROR,
        )
    if not 0 < master_port < 65536:
        raise SuperviseError(f"--master-port {master_port} is not a TCP port", ExitCode.USER_ERROR)
    return Topology(
        nnodes=nnodes,
        nproc_per_node=nproc_per_node,
        node_rank=node_rank,
        master_addr=ips[0] if ips else "127.0.0.1",
        master_port=master_port,
        accelerator=accelerator,
    )


def torchrun_executable() -> list[str]:
    """The torchrun of this Python (a venv that is not activated still works)."""
    beside = Path(sys.executable).parent / "torchrun"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def torchrun_argv(
    topo: Topology,
    trainer_args: list[str],
    *,
    module: str = DEFAULT_TRAINER_MODULE,
    executable: list[str] | None = None,
) -> list[str]:
    """The exact command the wrapper starts: a list, never a shell string."""
    return [
        *(executable or torchrun_executable()),
        "--nnodes", str(topo.nnodes),
        "--nproc_per_node", str(topo.nproc_per_node),
        "--node_rank", str(topo.node_rank),
        f"--master_addr={topo.master_addr}",
        f"--master_port={topo.master_port}",
        "-m", module,
        *trainer_args,
    ]  # fmt: skip
