"""SkyPilot's environment -> the torchrun argv (`torchrun_argv`), built the way
SkyPilot's own TorchTitan example (examples/training/torchtitan/torchtitan.yaml)
builds it. Pure functions of the environment, so they are tested without processes.

The torchrun the wrapper starts before its command is known: supervisor.node.prestarted.

What a rank died of: torchrun gives every worker an error file
(TORCHELASTIC_ERROR_FILE = `<log dir>/<run id>_<random>/attempt_<n>/<local rank>/error.json`:
torch/distributed/elastic/multiprocessing/api.py, DefaultLogsSpecs.reify), and
TorchTitan's `Trainer.__init__` and `Trainer.train` are decorated with torch's
`@record` (torchtitan/trainer.py), which writes `{"message": {"message":
"<Type>: <text>", "extraInfo": {"py_callstack", "timestamp"}}}` there
(ErrorHandler.record_exception). The wrapper points torchrun's log dir into its
run dir with PET_LOG_DIR (torchrun reads `--log-dir` from it: torch/distributed/run.py,
`action=env`; redirects and tee stay off, so the console is unchanged) and
`trainer_error` reads the first failure back, as torchrun picks its root cause.
"""

from __future__ import annotations

import glob
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from supervisor.contract.node import DEFAULT_MASTER_PORT, DEFAULT_TRAINER_MODULE
from supervisor.errors import SuperviseError
from supervisor.contract.exitcodes import ExitCode

LOG_DIR_ENV = "PET_LOG_DIR"  # torchrun's --log-dir, read from the environment
ERROR_LINE_CHARS = 400  # an exit reason is one line: a status column, a ledger field


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
        raise SuperviseError(f"SKYPILOT_NUM_NODES={nnodes} but SKYPILOT_NODE_IPS is empty: cannot find the head node",
                             ExitCode.USER_ERROR)
    if ips and len(ips) < nnodes:
        raise SuperviseError(f"SKYPILOT_NODE_IPS lists {len(ips)} address(es) for SKYPILOT_NUM_NODES={nnodes}",
                             ExitCode.USER_ERROR)
    if not 0 < master_port < 65536:
        raise SuperviseError(f"--master-port {master_port} is not a TCP port", ExitCode.USER_ERROR)
    return Topology(nnodes=nnodes, nproc_per_node=nproc_per_node, node_rank=node_rank,
                    master_addr=ips[0] if ips else "127.0.0.1", master_port=master_port, accelerator=accelerator)


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


def trainer_error(log_dir: str | Path, since: float = 0.0) -> str | None:
    """The first rank failure recorded under torchrun's `log_dir` at or after `since`
    (epoch seconds), as "local rank R: <Type>: <first line>"; None if none was recorded."""
    found = []
    for path in glob.glob(str(Path(log_dir) / "*" / "attempt_*" / "*" / "error.json")):
        try:
            if Path(path).stat().st_mtime < since:
                continue
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        message, stamp = _error_message(data)
        if message:
            found.append((stamp, Path(path).parent.name, message))
    if not found:
        return None
    _stamp, rank, message = min(found)
    return f"local rank {rank}: {message}"


def _error_message(data: object) -> tuple[str | None, int]:
    """(first line of the recorded exception, its timestamp) from one error file."""
    outer = data.get("message") if isinstance(data, dict) else None
    inner = outer.get("message") if isinstance(outer, dict) else outer
    if not isinstance(inner, str) or not inner.strip():
        return None, 0
    extra = outer.get("extraInfo", {}) if isinstance(outer, dict) else {}
    try:
        stamp = int(extra.get("timestamp", 0))
    except (TypeError, ValueError):
        stamp = 0
    line = next(ln.strip() for ln in inner.splitlines() if ln.strip())
    return line[:ERROR_LINE_CHARS], stamp
