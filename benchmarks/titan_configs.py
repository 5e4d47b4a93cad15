"""TorchTitan configs for benchmarks: `--module benchmarks.titan_configs
--config llama3_debugmodel_x4` (TorchTitan imports a fully qualified module as
its config_registry). Run from the repository root."""

from __future__ import annotations

import copy

from torchtitan.models.llama3.config_registry import llama3_debugmodel
from torchtitan.trainer import Trainer


def llama3_debugmodel_x4() -> Trainer.Config:
    """The llama3 debug model with its 6 layers repeated 4 times (24 layers,
    about 4x its parameters and checkpoint): a save whose bytes, not fixed
    costs, dominate, while a step still runs in seconds on 2 CPU cores."""
    config = llama3_debugmodel()
    model = config.model_spec.model
    model.layers = [copy.deepcopy(layer) for _ in range(4) for layer in model.layers]
    return config
