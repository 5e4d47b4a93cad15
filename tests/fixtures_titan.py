"""Fixtures: tiny corpus, tokenizer and TorchTitan args for CPU runs (owner: titan).

`titan_assets` builds the synthetic corpus and its tokenizer once per session;
`titan_args(dump_folder, steps=..., checkpoint_interval=...)` returns the
TorchTitan args for the llama3 debug model on them (checkpoint flags are the
caller's, like the node wrapper adds them).
"""

from __future__ import annotations

import functools

import pytest

from supervisor.titan.tinydata import TinyAssets, build_assets, debug_model_args


@pytest.fixture(scope="session")
def titan_assets(tmp_path_factory) -> TinyAssets:
    return build_assets(tmp_path_factory.mktemp("titan_assets"))


@pytest.fixture(scope="session")
def titan_args(titan_assets):
    """Callable: titan_args(dump_folder, **kw) -> TorchTitan argv list."""
    return functools.partial(debug_model_args, titan_assets)
