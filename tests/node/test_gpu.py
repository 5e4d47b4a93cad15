"""GPU or nothing (supervisor/node/gpu.py): a job that asks for GPUs never trains on the CPU."""

from __future__ import annotations

import time

import pytest

from supervisor.contract.exitcodes import ExitCode
from supervisor.node import gpu
from supervisor.contract.runtime import HEARTBEAT_DIR
from tests.node.nodeproc import cleanup, start_node

CPU_TORCH = {"torch": "2.13.0+cpu", "cuda": None, "available": False, "devices": 0}


def test_what_the_job_asks_for():
    assert gpu.gpus_requested({}) == 0  # no SkyPilot environment: a CPU job
    assert gpu.gpus_requested({"SKYPILOT_NUM_GPUS_PER_NODE": "0"}) == 0  # SkyPilot's CPU task
    assert gpu.gpus_requested({"SKYPILOT_NUM_GPUS_PER_NODE": "8"}) == 8


def test_one_line_names_the_cuda_build_and_the_driver():
    assert gpu.unusable(0, CPU_TORCH, None) is None  # a CPU job
    assert gpu.unusable(8, {"torch": "2.13.0", "cuda": "13.0", "available": True, "devices": 8}, "580.82") is None
    line = gpu.unusable(1, CPU_TORCH, None)
    assert "asks for 1 GPU(s) per node (SKYPILOT_NUM_GPUS_PER_NODE=1) but torch cannot use CUDA" in line
    assert "torch 2.13.0+cpu is a CPU build (torch.version.cuda None); no NVIDIA driver found" in line
    old_driver = gpu.unusable(8, {"torch": "2.13.0", "cuda": "13.0", "available": False, "devices": 0}, "535.104.05")
    assert "built for CUDA 13.0 (torch.version.cuda 13.0); NVIDIA driver 535.104.05" in old_driver
    assert "\n" not in old_driver


def test_the_cpu_layer_is_for_cpu_jobs_only(monkeypatch):
    from supervisor.titan import cpu_compat

    monkeypatch.setenv("SKYPILOT_NUM_GPUS_PER_NODE", "1")
    assert not cpu_compat.needed()
    monkeypatch.setenv("SKYPILOT_NUM_GPUS_PER_NODE", "0")
    assert cpu_compat.needed()  # this machine has no CUDA


@pytest.mark.slow
def test_a_gpu_job_on_a_cpu_machine_exits_78_before_torchrun(tmp_path):
    """The real node command with the real trainer module on this CPU-only machine."""
    log = tmp_path / "node.log"
    trainer = ["--module", "llama3", "--config", "llama3_debugmodel", "--training.steps", "3"]
    t0 = time.monotonic()
    proc = start_node(["--checkpoints", str(tmp_path / "ck"), "--cloud", "none", "--run-dir", str(tmp_path / "run")],
                      trainer, env={"SKYPILOT_NUM_GPUS_PER_NODE": "1"}, log=log)  # fmt: skip
    try:
        code = proc.wait(120)
    finally:
        cleanup(proc)
    seconds = time.monotonic() - t0
    text = log.read_text(errors="replace")
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == ExitCode.USER_ERROR and len(errors) == 1, text
    assert "torch cannot use CUDA" in errors[0] and "torch.version.cuda None" in errors[0], text
    assert not (tmp_path / "run" / HEARTBEAT_DIR).exists() and "step" not in text.lower().replace(errors[0].lower(), "")
    print(f"GPU job on a CPU machine: exit 78 after {seconds:.1f} s")  # reported, not asserted
