"""The engine on CUDA (triton backend, picked by itself) against transformers on a random-weight Llama."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [[1, 17, 230, 5, 99, 4, 812, 3], [7, 7, 7, 500, 61], list(range(20, 60))]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                         rope_theta=10000.0, rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).to(torch.float32)
    path = tmp_path_factory.mktemp("random-llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()


def _hf_greedy(hf_model, prompt):
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS,
                                pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_gpu_engine_float32_gives_transformers_greedy_tokens(model_dir, hf_model):
    from folio import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", device="cuda", num_kv_blocks=512)
    assert llm.engine.runner.backend.name == "triton"
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == _hf_greedy(hf_model, prompt)


def test_gpu_engine_bfloat16_logprobs_within_tolerance(model_dir, hf_model):
    from folio import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="bfloat16", device="cuda", num_kv_blocks=512)
    seq = PROMPTS[2] + _hf_greedy(hf_model, PROMPTS[2])
    out = llm.generate([seq], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)[0]
    with torch.no_grad():
        logits = hf_model(torch.tensor([seq], device="cuda")).logits[0].float()
    want = torch.log_softmax(logits, -1)[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].cpu()
    got = torch.tensor([entry[tok].logprob for entry, tok in zip(out.prompt_logprobs[1:], seq[1:])])
    # bf16 weights, activations and KV cache round to 2**-8 relative: the torch backend on CPU in bf16
    # lands at 0.6% relative (0.25 worst) on this model; a wrong attention lands at tens of percent.
    err = (got - want).norm() / want.norm()
    assert err < 0.02, f"relative error {err:.4f}"
    assert (got - want).abs().max().item() < 0.6
