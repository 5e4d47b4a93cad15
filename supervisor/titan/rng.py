"""Per-rank RNG state as a checkpoint Stateful: the piece of exact resume that
TorchTitan 0.3.0 does not save (it saves model, optimizer, lr_scheduler,
dataloader and train_state {step, ntokens_seen})."""

from __future__ import annotations

import logging
import pickle
import random
from typing import Any

log = logging.getLogger("supervisor.titan")

STATE_KEY = "rng"  # top-level key in the checkpoint, next to TorchTitan's own


def capture() -> dict[str, Any]:
    """python, numpy, torch CPU and (when present) every CUDA generator."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RngState:
    """Stateful (state_dict/load_state_dict) keyed by global rank, so DCP
    keeps every rank's generators instead of deduplicating them to rank 0's.
    Pickled like TorchTitan's dataloader state."""

    def __init__(self, rank: int):
        self.key = f"rank_{rank}"

    def state_dict(self) -> dict[str, Any]:
        return {self.key: pickle.dumps(capture())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.key not in state_dict:
            log.warning("checkpoint has no RNG state for %s (world size changed?); keeping the seeded RNG", self.key)
            return
        restore(pickle.loads(state_dict[self.key]))
