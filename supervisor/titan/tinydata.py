"""Tiny training assets made at run time: a synthetic corpus, a tokenizer trained
on it, and the TorchTitan args that train the llama3 debug model on them.

Tests, the demo and drills need real TorchTitan training without hub
downloads. TorchTitan 0.3.0 reads:

- a tokenizer from `--hf_assets_path` (a folder with `tokenizer.json` and
  `tokenizer_config.json` naming the bos/eos tokens);
- text data through its registered dataset `c4_test`, whose loader is
  `datasets.load_dataset(path, split="train")` with the `text` field of each
  sample; `--dataloader.dataset_path` points it at any local folder, so a folder
  holding one `train.jsonl` of `{"text": ...}` lines is a valid dataset.

Everything is deterministic (fixed seed), so two builds give identical files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
VOCAB_SIZE = 2000  # the llama3 debug model's embedding has 2048 rows
DATASET = "c4_test"  # TorchTitan's registered local-json text dataset

_SUBJECTS = ["the cat", "a dog", "the pilot", "my neighbour", "the robot", "a spot VM",
             "the scheduler", "an engineer", "the bucket", "the checkpoint"]
_VERBS = ["watches", "builds", "saves", "loads", "preempts", "restarts", "trains",
          "verifies", "commits", "forgets"]
_OBJECTS = ["the model", "a shard", "the weights", "the optimizer", "a small token",
            "the loss curve", "the dataloader", "seven apples", "the garden", "a river"]
_TAILS = ["today", "again", "before noon", "in the rain", "without notice",
          "with great care", "at step twelve", "every hour", "on spot capacity", "slowly"]


@dataclass(frozen=True)
class TinyAssets:
    """Paths of the assets built by `build_assets`."""

    hf_assets_path: Path  # tokenizer folder for --hf_assets_path
    dataset_path: Path  # folder for --dataloader.dataset_path


def make_corpus(n_docs: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic synthetic documents of a few sentences each."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS),
                     rng.choice(_TAILS)]
            sentences.append(" ".join(words).capitalize() + f" number {rng.randint(0, 999)}.")
        docs.append(f"Document {i}. " + " ".join(sentences))
    return docs


def train_tokenizer(docs: list[str], out_dir: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train a byte-level BPE tokenizer on `docs` and write an hf_assets folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": False,  # TorchTitan's dataset adds bos/eos itself
        "add_eos_token": False,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    return out_dir


def write_dataset(docs: list[str], out_dir: Path) -> Path:
    """Write `docs` as a local json dataset (`train.jsonl`, field `text`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "train.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return out_dir


def build_assets(root: Path, n_docs: int = 2000, seed: int = 0) -> TinyAssets:
    """Build corpus, tokenizer and dataset under `root` (idempotent)."""
    root = Path(root).absolute()
    hf, data = root / "hf_assets", root / "dataset"
    if not ((hf / "tokenizer.json").exists() and (data / "train.jsonl").exists()):
        docs = make_corpus(n_docs, seed)
        train_tokenizer(docs, hf)
        write_dataset(docs, data)
    return TinyAssets(hf_assets_path=hf, dataset_path=data)


def debug_model_args(
    assets: TinyAssets,
    dump_folder: str | Path,
    *,
    steps: int = 12,
    checkpoint_interval: int = 4,
    local_batch_size: int = 2,
    seq_len: int = 256,
    seed: int = 0,
) -> list[str]:
    """TorchTitan args for the llama3 debug model on the tiny assets.

    Deterministic: a fixed seed and `--debug.deterministic`, so a run and its
    resumed twin compute the same numbers. Checkpointing is left to the caller
    (the node wrapper adds `--checkpoint.enable --checkpoint.folder ...`).
    """
    return [
        "--module", "llama3",
        "--config", "llama3_debugmodel",
        "--hf_assets_path", str(Path(assets.hf_assets_path).absolute()),
        "--dump_folder", str(Path(dump_folder).absolute()),
        "--dataloader.dataset", DATASET,
        "--dataloader.dataset_path", str(Path(assets.dataset_path).absolute()),
        "--training.local_batch_size", str(local_batch_size),
        "--training.seq_len", str(seq_len),
        "--training.steps", str(steps),
        "--checkpoint.interval", str(checkpoint_interval),
        "--metrics.log_freq", "1",
        "--debug.seed", str(seed),
        "--debug.deterministic",
    ]
