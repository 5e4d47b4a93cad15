"""GPU or nothing: a job that asks for GPUs never trains on the CPU.

A node whose torch cannot use CUDA (a driver older than the torch build, a CPU
wheel, a broken image) would otherwise run TorchTitan through the CPU
compatibility layer on billed GPUs. The wrapper asks torch in a child process
(importing torch costs seconds; it runs while the catalog decides) and exits
78 before torchrun, naming torch's CUDA build and the driver's version.

"Asks for GPUs" is what a real node has: SKYPILOT_NUM_GPUS_PER_NODE >= 1, which
SkyPilot sets from the task's accelerators and to 0 for a CPU task
(sky/backends/task_codegen.py, RayCodeGen._add_ray_task and SlurmCodeGen.add_task);
the local backend copies that.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Mapping

ENV_GPUS = "SKYPILOT_NUM_GPUS_PER_NODE"
PROBE_TIMEOUT_S = 180.0  # a cold torch import on a fresh VM takes tens of seconds; a hung CUDA init longer
_PROBE = (
    "import json, torch\n"
    "ok = torch.cuda.is_available()\n"
    "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'available': ok,"
    " 'devices': torch.cuda.device_count() if ok else 0}))\n"
)


def gpus_requested(env: Mapping[str, str]) -> int:
    """GPUs per node the job asked for (0: a CPU job, or no SkyPilot environment)."""
    try:
        return max(int(env.get(ENV_GPUS, "0").strip() or 0), 0)
    except ValueError:
        return 0  # topology_from_env rejects it with the variable's name


def unusable(wanted: int, probe: dict, driver: str | None) -> str | None:
    """The one line that ends a GPU job whose torch cannot use CUDA; None when it can."""
    if wanted < 1 or (probe.get("available") and probe.get("devices", 0) >= 1):
        return None
    build = probe.get("cuda")
    what = "a CPU build" if build is None else f"built for CUDA {build}"
    seen = f"NVIDIA driver {driver}" if driver else "no NVIDIA driver found (no nvidia-smi)"
    why = probe.get("error") or f"torch {probe.get('torch', '?')} is {what} (torch.version.cuda {build})"
    return (f"the job asks for {wanted} GPU(s) per node ({ENV_GPUS}={wanted}) but torch cannot use CUDA: "
            f"{why}; {seen}. Nothing was started: install a torch built for a CUDA this driver supports, "
            f"or use an image with a driver that supports the torch build")


def driver_version(timeout_s: float = 20.0) -> str | None:
    """The NVIDIA driver's version from nvidia-smi; None when there is none or it fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    versions = sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})
    return ", ".join(versions) if out.returncode == 0 and versions else None


class CudaProbe:
    """torch's own answer, from a child started now and read later (`result`)."""

    def __init__(self, preexec_fn=None):
        self._proc = subprocess.Popen([sys.executable, "-c", _PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, preexec_fn=preexec_fn)  # fmt: skip

    def result(self, timeout_s: float = PROBE_TIMEOUT_S) -> dict:
        try:
            out, err = self._proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
            return {"available": False, "error": f"torch did not answer within {timeout_s:.0f} s (a hung CUDA init?)"}
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            last = (err.strip().splitlines() or ["no output"])[-1]
            return {"available": False, "error": f"importing torch failed (exit {self._proc.returncode}): {last}"}
