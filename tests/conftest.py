"""Shared fixtures: the bundled model, a transformers reference on the same weights, one offline LLM."""

import os
import shutil

# Triton must learn it has no GPU before anything imports it (transformers does): interpret instead.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="session")
def model_dir():
    from services.common.bundled_model import ensure_bundled_model

    return ensure_bundled_model(quiet=True)


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """transformers' own Llama on the converted weights, float32: the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    m.eval()
    return m


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def llm():
    from folio import LLM

    return LLM(dtype="float32", cpu_kv_cache_bytes=256 << 20)


@pytest.fixture
def one_thread():
    """One torch thread for the test: on a CPU shared with other work, OpenMP threads spin and run tiny
    ops many times slower, which makes timing- and step-count-sensitive tests unsteady."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
