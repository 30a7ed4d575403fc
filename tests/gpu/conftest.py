"""GPU tests: each module skips itself where CUDA is absent.

Sets the same import-time state as tests/kernels/conftest.py, so collecting this folder first on a
CPU machine cannot import the kernels compiled-mode before the interpreter flag is set.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for path in (_ROOT, os.path.join(_ROOT, "tests", "kernels")):
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture(scope="module")
def random_llama_dir(tmp_path_factory):
    """A small random-weight Llama (GQA, head_dim 32) saved as a checkpoint: the GPU machine has no
    bundled model, so engine-level GPU tests feed it token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                         initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("random-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)
