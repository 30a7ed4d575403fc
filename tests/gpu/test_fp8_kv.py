"""FP8 KV cache kernels compiled on a GPU (Ada/Hopper): the write bit-exact with torch's float8 conversion,
decode and prefill/extend over an fp8 pool with bf16/fp16 queries against the torch references, the attention
variants, copy_blocks. Run: .venv/bin/python -m pytest -q tests/gpu/test_fp8_kv.py"""

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from kernels.copy_blocks import copy_blocks, copy_blocks_ref  # noqa: E402
from kernels.paged_decode import paged_decode, paged_decode_ref  # noqa: E402
from kernels.paged_prefill import paged_prefill, paged_prefill_ref  # noqa: E402
from kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref  # noqa: E402
from paged_cases import assert_close, fp8_batch, hard_e4m3_values, make_batch, poisoned_like  # noqa: E402
from services.engine.attention.kv_quant import (  # noqa: E402
    FP8_KV_DTYPE, fp8_zeros, quantize_fp8, quantize_kv_fp8)
from services.engine.attention.params import AttentionParams  # noqa: E402
from services.engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from services.engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from services.engine.model.layers.attention import alibi_slopes  # noqa: E402

DEVICE = torch.device("cuda")


def _fp8_pool(batch, k_scale, v_scale):
    """make_batch's random pool (N(0,1)) spread to 0.01 ... 3 per channel and stored as fp8 with the scales."""
    spread = torch.logspace(-2, 0.5, batch.kv_cache.shape[-1], device=DEVICE)
    return quantize_kv_fp8(batch.kv_cache.float() * spread, k_scale, v_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_reshape_and_cache_fp8_bits_equal_torch(dtype):
    x = hard_e4m3_values().to(dtype)
    x = torch.cat([x, x.new_zeros(-x.numel() % (8 * 128))]).view(-1, 8, 128).to(DEVICE)
    n = x.shape[0]
    num_blocks = -(-4 * n // 16)
    slots = torch.randperm(num_blocks * 16, device=DEVICE)[:n]
    slots[1] = -1
    got = fp8_zeros((2, num_blocks, 16, 8, 128), DEVICE)
    want = got.clone()
    reshape_and_cache(x, x.flip(0), got, slots, 0.37, 2.5)
    reshape_and_cache_ref(x, x.flip(0), want, slots, 0.37, 2.5)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("dtype,group,head_dim,num_splits", [
    (torch.bfloat16, 4, 128, 1), (torch.bfloat16, 4, 128, None), (torch.bfloat16, 8, 64, None),
    (torch.float16, 1, 128, None)])
def test_gpu_paged_decode_fp8_pool(dtype, group, head_dim, num_splits):
    num_kv_heads = 8 // min(group, 4)
    rng = random.Random(group + head_dim)
    seq_lens = [rng.randint(1, 3000) for _ in range(20)] + [1, 4096]
    batch = make_batch(seq_lens, [1] * len(seq_lens), group * num_kv_heads, num_kv_heads, head_dim, 16, dtype,
                       DEVICE, spare_blocks=50)
    cache = _fp8_pool(batch, 0.05, 0.04)
    out = paged_decode(batch.q, cache, batch.block_tables, batch.seq_lens, head_dim**-0.5,
                       max_seq_len=batch.max_seq_len, num_splits=num_splits, out=poisoned_like(batch.q),
                       k_scale=0.05, v_scale=0.04)
    ref = paged_decode_ref(batch.q, cache, batch.block_tables, batch.seq_lens, head_dim**-0.5, 0.05, 0.04)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("config", [
    dict(TILE_N=64, num_warps=4, num_stages=2, F16_DOTS=False),  # bf16 dots (the upcast through float16)
    dict(TILE_N=64, num_warps=4, num_stages=3), dict(TILE_N=128, num_warps=8, num_stages=1),
    dict(TILE_N=64, num_warps=4, num_stages=1, PREFETCH=True), dict(TILE_N=32, num_warps=4, num_stages=1, PREFETCH=True),
    dict(TILE_N=64, num_warps=4, num_stages=2, CVT_BITS=True)])
@pytest.mark.parametrize("q_scale", [1.0, 3e4])
def test_gpu_paged_decode_fp8_pool_launches(config, q_scale):
    """The launches bench/fp8_where.py chooses among, with bf16 queries (float16 dots unless F16_DOTS=False;
    3e4 * N(0,1) queries pass float16's range before their power-of-two scaling), splits 1 and 4."""
    rng = random.Random(7)
    seq_lens = [rng.randint(1, 900) for _ in range(30)] + [1, 2048]
    batch = make_batch(seq_lens, [1] * len(seq_lens), 32, 8, 128, 16, torch.bfloat16, DEVICE, spare_blocks=20)
    cache = _fp8_pool(batch, 0.05, 0.04)
    q = (batch.q.float() * q_scale).to(torch.bfloat16)
    scale = 128 ** -0.5 / q_scale
    ref = paged_decode_ref(q, cache, batch.block_tables, batch.seq_lens, scale, 0.05, 0.04)
    for splits in (1, 4):
        out = paged_decode(q, cache, batch.block_tables, batch.seq_lens, scale, max_seq_len=batch.max_seq_len,
                           num_splits=splits, out=poisoned_like(q), config=config, k_scale=0.05, v_scale=0.04)
        assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("dtype,group,head_dim", [(torch.bfloat16, 4, 128), (torch.float16, 1, 64)])
def test_gpu_paged_prefill_fp8_pool(dtype, group, head_dim):
    num_kv_heads = 8 // group
    seq_lens = [700, 1, 130, 2048, 33, 517]
    query_lens = [700, 1, 60, 300, 1, 17]  # prefill, decode, extends
    batch = make_batch(seq_lens, query_lens, group * num_kv_heads, num_kv_heads, head_dim, 16, dtype, DEVICE)
    cache = _fp8_pool(batch, 0.05, 0.04)
    out = paged_prefill(batch.q, cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, head_dim**-0.5,
                        out=poisoned_like(batch.q), k_scale=0.05, v_scale=0.04)
    ref = paged_prefill_ref(batch.q, cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                            head_dim**-0.5, 0.05, 0.04)
    assert_close(out, ref, dtype)


MIXED = [(300, 300), (450, 130), (210, 1), (1, 1)]  # the prefill kernel
DECODE = [(210, 1), (1, 1), (2770, 1), (64, 1)]  # the decode kernel


@pytest.mark.parametrize("steps,variant", [(MIXED, "plain"), (DECODE, "plain"), (MIXED, "softcap_window"),
                                           (DECODE, "alibi")])
def test_gpu_triton_backend_fp8_equals_torch_backend_bf16(steps, variant):
    q, k, v, cache, meta = fp8_batch(DEVICE, steps, torch.bfloat16, k_scale=0.5, v_scale=2.0, num_heads=32,
                                     num_kv_heads=8, head_dim=128)
    extra = {"plain": {}, "softcap_window": dict(logit_softcap=30.0, sliding_window=200),
             "alibi": dict(alibi_slopes=alibi_slopes(32).to(DEVICE))}[variant]
    params = AttentionParams(scale=128**-0.5, k_scale=0.5, v_scale=2.0, **extra)
    cache_torch = cache.clone()
    got = TritonAttentionBackend().forward(q, k, v, cache, meta, params)
    want = TorchAttentionBackend().forward(q, k, v, cache_torch, meta, params)
    assert torch.equal(cache.view(torch.uint8), cache_torch.view(torch.uint8))
    assert_close(got, want, torch.bfloat16)


def test_gpu_copy_blocks_fp8():
    caches = [quantize_fp8(torch.randn(2, 64, 16, 8, 128, device=DEVICE) * 50, 1.0) for _ in range(3)]
    expected = [c.clone() for c in caches]
    src = torch.tensor([1, 4, 9, 33], device=DEVICE)
    dst = torch.tensor([50, 0, 63, 2], device=DEVICE)
    copy_blocks(caches, src, dst)
    copy_blocks_ref([e.view(torch.uint8) for e in expected], src, dst)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(caches, expected))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                         initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("random-llama-fp8")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_gpu_engine_fp8_cuda_graphs_prefix_cache_and_forks(llama_dir):
    """Decode replayed from CUDA graphs gives the eager steps' tokens on an fp8 pool; a prefix-cache hit and
    copy-on-write forks (n=3) give the same tokens as the first run."""
    from folio import LLM, SamplingParams

    prompts = [list(range(20, 61)), [1, 17, 230, 5, 99, 4, 812, 3]]
    greedy = SamplingParams(temperature=0, max_tokens=24, logprobs=0, ignore_eos=True)
    runs = {}
    for eager in (True, False):
        llm = LLM(str(llama_dir), device="cuda", dtype="bfloat16", kv_cache_dtype="fp8", enforce_eager=eager,
                  max_model_len=512, num_kv_blocks=256, max_num_seqs=8)
        assert llm.engine.runner.kv_caches[0].dtype == FP8_KV_DTYPE
        runs[eager] = [o.outputs[0] for o in llm.generate(prompts, greedy, use_tqdm=False)]
    for a, b in zip(runs[False], runs[True]):
        assert a.token_ids == b.token_ids
    again = llm.generate(prompts[:1], greedy, use_tqdm=False)[0]
    assert again.num_cached_tokens >= 32 and again.outputs[0].token_ids == runs[False][0].token_ids
    forks = llm.generate(prompts[:1], SamplingParams(n=3, temperature=0, max_tokens=24, ignore_eos=True),
                         use_tqdm=False)[0]
    assert all(o.token_ids == runs[False][0].token_ids for o in forks.outputs)
