"""TorchTitan configs at checkpoint sizes users run, for CPU rehearsals:
`--module benchmarks.scale_configs --config NAME` (TorchTitan 0.3.0 imports a
fully qualified module as its config registry; run from the repository root).

TorchTitan 0.3.0 has no command-line override for the model's shape (its
`Trainer.Config.model_spec` is not a CLI section; `--help` lists no model
flags), so the llama3 debug model is made wider and deeper here, with
TorchTitan's own llama3 builders (`torchtitan.models.llama3`: the debug
model's layer recipe, norms, inits and RoPE, only `dim`/`n_layers` changed);
everything else is `llama3_debugmodel()`'s. The vocabulary stays 2048 (the
tiny tokenizer has 2000 tokens).

Checkpoint (fp32 params + two AdamW moments, ~12 bytes per parameter):

| config                | dim  | layers | params | checkpoint | per rank (2) |
|-----------------------|------|--------|--------|------------|--------------|
| llama3_scale_quick    | 1024 | 2      |  30 M  | 0.33 GiB   | 171 MiB      |
| llama3_scale_ci       | 1024 | 4      |  56 M  | 0.62 GiB   | 318 MiB      |
| llama3_scale_4g       | 2048 | 7      | 368 M  | 4.11 GiB   | 2.06 GiB     |
| llama3_scale          | $SUPERVISE_SCALE_DIM (2048), $SUPERVISE_SCALE_LAYERS (7)  |

(`llama3_scale` reads its shape from the environment, which torchrun hands to
every rank: benchmarks/scale_rehearsal.py `--gib` uses it.)
"""

from __future__ import annotations

import os

from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim
from torchtitan.models.common.config_utils import decoder_vocab_size
from torchtitan.models.llama3 import (
    _EMBEDDING_INIT,
    _NORM_INIT,
    _build_llama3_layers,
    _output_linear_init,
    model_registry,
)
from torchtitan.models.llama3.config_registry import llama3_debugmodel
from torchtitan.models.llama3.model import Llama3Model
from torchtitan.trainer import Trainer

VOCAB = 2048
HEAD_DIM = 64


def scaled_model(dim: int, n_layers: int, attn_backend: str = "flex") -> Llama3Model.Config:
    """TorchTitan's `_debugmodel` recipe (torchtitan/models/llama3/__init__.py) at another width and depth."""
    n_heads = dim // HEAD_DIM
    return Llama3Model.Config(
        dim=dim,
        vocab_size=VOCAB,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=dim, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=VOCAB, param_init=_output_linear_init(dim)),
        layers=_build_llama3_layers(
            fuse_qkv=True,
            n_layers=n_layers,
            dim=dim,
            n_heads=n_heads,
            hidden_dim=compute_ffn_hidden_dim(dim, multiple_of=256),
            rope=ComplexRoPE.Config(dim=HEAD_DIM, max_seq_len=131072, theta=500000, scaling="llama"),
            attn_backend=attn_backend,
        ),
    )


def scaled_config(dim: int, n_layers: int) -> Trainer.Config:
    config = llama3_debugmodel()
    spec = model_registry("debugmodel")
    spec.model = scaled_model(dim, n_layers)
    spec.flavor = f"debugmodel-d{dim}-l{n_layers}"
    config.model_spec = spec
    config.loss = ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(spec)))
    return config


def parameters(dim: int, n_layers: int) -> int:
    """Parameters of `scaled_model(dim, n_layers)` (no GQA, untied embeddings)."""
    hidden = compute_ffn_hidden_dim(dim, multiple_of=256)
    per_layer = 4 * dim * dim + 3 * dim * hidden + 2 * dim
    return n_layers * per_layer + 2 * VOCAB * dim + dim


def checkpoint_bytes(dim: int, n_layers: int) -> int:
    """fp32 params + two AdamW moments (DCP adds a few KiB of metadata and train state)."""
    return 12 * parameters(dim, n_layers)


def llama3_scale_quick() -> Trainer.Config:
    return scaled_config(1024, 2)


def llama3_scale_ci() -> Trainer.Config:
    """Per-rank shard >= 256 MiB with 2 ranks (multipart on every S3 store)."""
    return scaled_config(1024, 4)


def llama3_scale_4g() -> Trainer.Config:
    """A model state of at least 4 GiB."""
    return scaled_config(2048, 7)


def llama3_scale() -> Trainer.Config:
    return scaled_config(int(os.environ.get("SUPERVISE_SCALE_DIM", "2048")),
                         int(os.environ.get("SUPERVISE_SCALE_LAYERS", "7")))
