"""Fixtures: tiny corpus, tokenizer and TorchTitan args for CPU runs (owner: titan)."""
