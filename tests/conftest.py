"""Fixtures shared by the trainer's tests: one small tiny-preset model built once per session."""

from __future__ import annotations

import pytest

# A tiny-preset model smaller than the default, so the tests that train it run in seconds on 2 cores.
SMALL_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "intermediate_size": 128,
}


@pytest.fixture(scope="session")
def small_tiny_dir(tmp_path_factory):
    """A tiny-preset model folder (tokenizer trained on the project's text, random weights)."""
    from models import tiny

    return tiny.build_tiny(tmp_path_factory.mktemp("small-tiny"), seed=0, **SMALL_TINY)
