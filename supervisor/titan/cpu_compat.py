"""Make TorchTitan 0.3.0 train the llama3 debug model on CPU (1 or 2 gloo ranks).

TorchTitan assumes an accelerator. Tests, the demo and drills run on CPU, so
this module applies a few runtime monkeypatches, each with the reason next to
it. Nothing in TorchTitan's files is changed. `apply()` does nothing when an
accelerator is present or the job asks for GPUs (a GPU job without CUDA must
fail, not train on the CPU: supervisor.node.gpu), and must run before
`torchtitan.trainer` is imported (several TorchTitan modules copy
`device_type` at import time).
"""

from __future__ import annotations

import os
import sys
import types

_applied = False


def needed() -> bool:
    """True for a CPU job (no GPUs asked for) without a CUDA device."""
    import torch

    from supervisor.node.gpu import gpus_requested

    return not gpus_requested(os.environ) and not torch.cuda.is_available()


def apply() -> bool:
    """Apply the CPU patches once when needed; True when they are active."""
    global _applied
    if _applied:
        return True
    if not needed():
        return False
    if "torchtitan.trainer" in sys.modules:
        raise RuntimeError("cpu_compat.apply() must run before torchtitan.trainer is imported")
    _import_without_triton()
    _patch_device_type()
    _patch_flex_attention()
    _patch_set_timeout()
    _patch_fsdp_reduce_op()
    _applied = True
    return True


def cpu_args(world_size: int) -> list[str]:
    """TorchTitan args a CPU run needs in addition to the user's."""
    args = ["--training.disable_cuda_graphs"]  # CUDA graphs need CUDA
    if world_size > 1:
        # torch 2.13's default local-SPMD backend fails with 2 gloo ranks; the
        # partial_dtensor backend (plain FSDP2 DTensors) works.
        args += ["--parallelism.spmd_backend", "partial_dtensor"]
    return args


class _CpuDeviceModule:
    """`torch.cpu` plus the torch.cuda-style calls TorchTitan makes on its
    device module (memory monitor, barrier, profiler): CPU has no per-device
    memory statistics, so those report empty/zero."""

    def __getattr__(self, name):
        import torch

        return getattr(torch.cpu, name)

    def set_device(self, device) -> None:
        pass

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        return 1

    def get_device_name(self, device=None) -> str:
        return "cpu"

    def get_device_properties(self, device=None):
        import psutil

        return types.SimpleNamespace(total_memory=psutil.virtual_memory().total)

    def memory_stats(self, device=None) -> dict:
        return {}

    def reset_peak_memory_stats(self, device=None) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def synchronize(self, device=None) -> None:
        pass


# TorchTitan modules that copy `device_type`/`device_module` at import time.
_DEVICE_MODULES = (
    "torchtitan.tools.utils",
    "torchtitan.components.metrics",
    "torchtitan.tools.profiler",
    "torchtitan.distributed.utils",
    "torchtitan.distributed.parallel_dims",
    "torchtitan.models.common.token_dispatcher",
)


def _patch_device_type() -> None:
    # tools.utils computes `_get_available_device_type() or "cuda"`: on a CPU
    # machine TorchTitan believes it runs on CUDA, calls torch.cuda.set_device,
    # asks torch.cuda for memory stats and picks NCCL. Say "cpu" (gloo is the
    # default backend for cpu) with a device module that answers those calls.
    import importlib

    cpu = _CpuDeviceModule()
    for name in _DEVICE_MODULES:
        mod = importlib.import_module(name)
        if hasattr(mod, "device_type"):
            mod.device_type = "cpu"
        if hasattr(mod, "device_module"):
            mod.device_module = cpu


_TRITON_MODULES = ("torchtitan.distributed.minimal_async_ep.kernels",)


def _import_without_triton() -> None:
    # torch CPU wheels ship no triton, but TorchTitan's expert-parallel kernel
    # module imports it unconditionally and is reached from the dense llama3
    # path (models.common.decoder -> moe -> token_dispatcher). Its kernels are
    # never launched for a dense model. Register a stand-in for that one
    # module whose functions raise if ever called; no fake `triton` is shown
    # to torch, which probes for triton itself.
    for name in _TRITON_MODULES:
        if name in sys.modules:
            continue
        stub = types.ModuleType(name, "CPU stand-in: triton kernels are unavailable")

        def _kernel(attr: str, _mod: str = name):
            if attr.startswith("__"):
                raise AttributeError(attr)

            def unavailable(*args, **kwargs):
                raise RuntimeError(f"{_mod}.{attr} needs triton, which a CPU run lacks")

            return unavailable

        stub.__getattr__ = _kernel  # type: ignore[method-assign]
        sys.modules[name] = stub


def _math_flex_attention(q, k, v, *, score_mod=None, block_mask=None, scale=None,
                         enable_gqa=False, return_aux=None, kernel_options=None):
    """Plain-math `flex_attention` (B, N, L, H layout) for CPU training: the
    dense mask is materialised from the BlockMask's own mask_mod, so the
    semantics (causal / per-document causal) are TorchTitan's."""
    import math

    import torch
    from torch.nn.attention.flex_attention import AuxOutput, create_mask

    if score_mod is not None:
        raise NotImplementedError("cpu_compat: score_mod is not supported on CPU")
    n_heads = q.shape[1]
    if enable_gqa and k.shape[1] != n_heads:
        k = k.repeat_interleave(n_heads // k.shape[1], dim=1)
        v = v.repeat_interleave(n_heads // v.shape[1], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if block_mask is not None:
        q_len, kv_len = block_mask.seq_lengths
        mask = create_mask(block_mask.mask_mod, block_mask.kv_num_blocks.shape[0],
                           block_mask.kv_num_blocks.shape[1], q_len, kv_len, device=q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    want_lse = return_aux is not None and return_aux.lse
    return out, AuxOutput(lse=lse if want_lse else None)


def _patch_flex_attention() -> None:
    # FlexAttention has no CPU backward ("FlexAttention does not support
    # backward on CPU"), and TorchTitan wraps both flex_attention and
    # create_block_mask in torch.compile, which on CPU means slow inductor C++
    # builds per process. The llama3 debug model uses Flex by default: swap
    # the compiled kernel for the math version above and build block masks
    # eagerly. Same masks, same maths; only speed differs.
    # set_determinism (run by every Trainer with --debug.deterministic)
    # re-assigns FlexAttention's compiled kernel, so re-apply after it.
    import functools

    import torchtitan.distributed.utils as dist_utils
    import torchtitan.models.common.attention as attn
    from torch.nn.attention.flex_attention import create_block_mask

    def use_math_kernel() -> None:
        attn.FlexAttention._compiled_flex_attn = staticmethod(_math_flex_attention)

    original = dist_utils.set_determinism

    @functools.wraps(original)
    def set_determinism(*args, **kwargs):
        original(*args, **kwargs)
        use_math_kernel()

    use_math_kernel()
    dist_utils.set_determinism = set_determinism
    attn._compiled_create_block_mask = create_block_mask


def _patch_set_timeout() -> None:
    # After the first step TorchTitan shortens every process group's timeout
    # with torch.distributed.set_timeout, which the torch 2.13 CPU wheel does
    # not export; its private equivalent handles gloo groups.
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _set_pg_timeout

    if not hasattr(dist, "set_timeout"):
        dist.set_timeout = _set_pg_timeout


def _patch_fsdp_reduce_op() -> None:
    # With 2+ ranks, FSDP2 reduce-scatters gradients with
    # ReduceOp.PREMUL_SUM(1/factor) (TorchTitan sets a gradient divide
    # factor), which Gloo rejects: "Cannot use ReduceOp.PREMUL_SUM with
    # Gloo". FSDP2's own fallback for backends that only sum (it uses it for
    # MTIA) is force_sum_reduction_for_comms: SUM, then divide locally. Turn
    # it on for every reduction, as all of a CPU run's groups are Gloo.
    import functools

    import torch.distributed.fsdp._fully_shard._fsdp_collectives as coll

    original = coll._get_gradient_divide_factors

    @functools.wraps(original)
    def sum_only(reduce_scatter_group, all_reduce_group, reduce_dtype,
                 device_type="", factor=None, force_sum_reduction_for_comms=False):
        return original(reduce_scatter_group, all_reduce_group, reduce_dtype,
                        device_type, factor, True)

    coll._get_gradient_divide_factors = sum_only
