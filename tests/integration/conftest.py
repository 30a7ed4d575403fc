"""Integration fixtures: stacks of real processes on loopback, stopped in teardown (see helpers.py)."""

from __future__ import annotations

import pytest

from tests.integration.helpers import start_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The shared stack: tokenizer, two engines, router. Tests here must leave it as they found it."""
    s = start_stack(tmp_path_factory, "stack", engines=2)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def offline_llm():
    """The offline API on the same model, for reference outputs."""
    from folio import LLM

    return LLM(num_kv_blocks=64, max_model_len=1024, dtype="float32", device="cpu")


