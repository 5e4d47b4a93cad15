"""Read what a run produced: tensors from a DCP checkpoint (local path or
fsspec URL such as s3://) and the per-step losses the trainer recorded.

Used by tests, `supervise drill` and anyone checking that a resumed run
matches an uninterrupted one bit for bit. Needs no process group.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

# TorchTitan's non-model checkpoint keys (plus ours): everything else at the
# top level of a checkpoint is a model parameter or buffer.
NON_MODEL_KEYS = ("optimizer", "lr_scheduler", "dataloader", "train_state", "rng")


def dcp_reader(path: str):
    """A DCP StorageReader for a local folder or an fsspec URL; the URL's filesystem is its
    own (fsspec caches one per arguments, and an S3 one keeps the endpoint of its day)."""
    if "://" in str(path):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(str(path), skip_instance_cache=True)
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path))


def step_path(checkpoints: str, step: int) -> str:
    return f"{str(checkpoints).rstrip('/')}/step-{step}"


def load_tensors(checkpoint: str, model_only: bool = True) -> dict:
    """Every tensor in one `step-N` checkpoint, as full (unsharded) tensors.

    With `model_only`, just the model's parameters and buffers; otherwise the
    optimizer's tensors too (keys as DCP flattened them).
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    reader = dcp_reader(checkpoint)
    meta = reader.read_metadata().state_dict_metadata
    keys = {
        k for k, m in meta.items()
        if isinstance(m, TensorStorageMetadata)
        and not (model_only and k.split(".", 1)[0] in NON_MODEL_KEYS)
    }
    with warnings.catch_warnings():  # "assuming ... a single process": yes, on purpose
        warnings.simplefilter("ignore", UserWarning)
        flat = _load_state_dict_from_keys(keys=keys, storage_reader=dcp_reader(checkpoint))
    return _flatten(flat)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def tensor_differences(a: dict, b: dict) -> list[str]:
    """Names whose tensors are not bit-identical (or exist on one side only)."""
    import torch

    diffs = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(_bits(x), _bits(y))
        if not same:
            diffs.append(k)
    return diffs


def _bits(t):
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def read_losses(dump_folder: str | Path, incarnation: str | None = None) -> dict[int, float]:
    """step -> loss from the trainer's metrics file (later lines win, so a
    step recomputed after a resume shows its latest value)."""
    from supervisor.titan.trainer_files import METRICS_FILE

    path = Path(dump_folder) / METRICS_FILE
    out: dict[int, float] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if incarnation is None or rec.get("incarnation") == incarnation:
            out[int(rec["step"])] = float(rec["loss"])
    return out
