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


class _OneThreadLLM:
    """The offline LLM run on one torch thread while the stack's engines share the cores (oversubscribed
    OpenMP threads spin and run many times slower); the process's thread setting is restored after."""

    def __init__(self, llm):
        self.llm = llm

    def _call(self, fn, *a, **kw):
        import torch

        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*a, **kw)
        finally:
            torch.set_num_threads(n)

    def generate(self, *a, **kw):
        return self._call(self.llm.generate, *a, **kw)

    def chat(self, *a, **kw):
        return self._call(self.llm.chat, *a, **kw)

    def beam_search(self, *a, **kw):
        return self._call(self.llm.beam_search, *a, **kw)


@pytest.fixture(scope="session")
def offline_llm():
    """The offline API on the same model, for reference outputs."""
    from folio import LLM

    return _OneThreadLLM(LLM(num_kv_blocks=64, max_model_len=1024, dtype="float32", device="cpu"))


