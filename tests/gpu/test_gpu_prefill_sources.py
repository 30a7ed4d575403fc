"""The prefill kernel's key sources and structural switches, compiled, at real sizes in bf16 and fp16,
against the torch reference (tests/kernels/test_paged_prefill.py has the same under the interpreter)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from kernels.paged_prefill import paged_prefill, paged_prefill_ref  # noqa: E402
from paged_cases import assert_close, assert_skip_single, make_batch, poisoned_like  # noqa: E402

DEVICE = torch.device("cuda")
# A long prompt, chunks after cached prefixes, decodes, lengths off the block and tile grids.
STEPS = [(1500, 1500), (900, 257), (2100, 64), (333, 1), (1, 1), (4000, 1), (129, 129)]
CONFIGS = [
    dict(NEW_KV="tma"),
    dict(NEW_KV="ptr"),
    dict(NEW_KV="tma", BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, REVERSE=True, LAZY_RESCALE=True),
    dict(NEW_KV="paged", BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, BLOCKWISE=True, PACK_GQA=False),
    # one loop for free and diagonal tiles (masked by a runtime branch), a persistent grid, 32-key tiles
    dict(NEW_KV="tma", BLOCK_N=32, num_stages=3, ONE_LOOP=2, PERSISTENT=2, SEQ_VEC=64),
    dict(NEW_KV="paged", ONE_LOOP=1),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,head_dim", [(4, 128), (3, 64), (1, 128)])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gpu_prefill_key_sources(dtype, group, head_dim, config):
    num_kv_heads = 8 // min(group, 4)
    batch = make_batch([s for s, _ in STEPS], [q for _, q in STEPS], group * num_kv_heads, num_kv_heads, head_dim,
                       16, dtype, DEVICE, num_padding_tokens=5)
    n = int(batch.query_start_loc[-1])
    out = paged_prefill(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                        head_dim**-0.5, out=poisoned_like(batch.q), config=config, k=batch.k, v=batch.v)
    ref = paged_prefill_ref(batch.q[:n], batch.kv_cache, batch.block_tables, batch.seq_lens,
                            batch.query_start_loc, head_dim**-0.5)
    assert_close(out[:n], ref, dtype)
    assert out[n:].isnan().all()


def test_gpu_prefill_strided_kv_views():
    # k/v as the model passes them: views of one fused qkv buffer (row stride (Hq + 2 Hkv) * D).
    batch = make_batch([700, 333], [200, 333], 32, 8, 128, 16, torch.bfloat16, DEVICE)
    qkv = torch.cat([batch.q.flatten(1), batch.k.flatten(1), batch.v.flatten(1)], dim=1)
    k = qkv[:, 32 * 128: 40 * 128].view(-1, 8, 128)
    v = qkv[:, 40 * 128:].view(-1, 8, 128)
    ref = paged_prefill_ref(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.1)
    for mode in ("tma", "ptr"):
        out = paged_prefill(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.1,
                            config=dict(NEW_KV=mode), k=k, v=v)
        assert_close(out, ref, torch.bfloat16)


GLUON_CONFIGS = [
    dict(GLUON=True, BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, maxnreg=None),
    dict(GLUON=True, BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3, maxnreg=128, SEQ_VEC=4,  # binary search
         ONE_LOOP=2),  # the causal compare only on the tiles reaching past the first row
    dict(GLUON=True, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, maxnreg=None, PV_ASYNC=True),
    # the warp-specialized kernel: a TMA producer warp, two 64-row consumer warpgroups over one K/V ring
    dict(GLUON=True, GLUON_WS=True, BLOCK_N=64, num_stages=2, maxnreg=None),
    dict(GLUON=True, GLUON_WS=True, BLOCK_N=128, num_stages=2, maxnreg=None, ONE_LOOP=2, OVERLAP_QK=True, SEQ_VEC=4),
    dict(GLUON=True, GLUON_WS=True, BLOCK_N=64, num_stages=3, maxnreg=None, ONE_LOOP=2, OVERLAP_QK=True,
         PERSISTENT=1),  # one program per SM walking the work items (the ring and q buffers across items)
    # FlashAttention-3's order (the softmax under the previous PV) with the consumers' issues alternating
    dict(GLUON=True, GLUON_WS=True, BLOCK_N=128, num_stages=2, maxnreg=None, ONE_LOOP=2, OVERLAP_QK=2,
         PINGPONG=True, PERSISTENT=1),
    dict(GLUON=True, GLUON_WS=True, BLOCK_N=128, num_stages=3, maxnreg=None, ONE_LOOP=2, OVERLAP_QK=2,
         PERSISTENT=1, Q_BUFS=1),  # one q buffer per consumer, three 128-key stages
    # each program takes its next work item from a global counter (the producer names it to the consumers)
    dict(GLUON=True, GLUON_WS=True, BLOCK_N=64, num_stages=3, maxnreg=None, ONE_LOOP=2, OVERLAP_QK=2, PINGPONG=True,
         PERSISTENT=1, DYNAMIC=True, HEAVY_FIRST=True),
    # the next item's ticket taken one item ahead
    dict(GLUON=True, GLUON_WS=True, BLOCK_N=128, num_stages=3, maxnreg=None, ONE_LOOP=2, OVERLAP_QK=2, PINGPONG=True,
         PERSISTENT=1, Q_BUFS=1, DYNAMIC=True, AHEAD=True, HEAVY_FIRST=True),
    # whole items' output through a staging buffer per consumer and TMA (partial ones by plain stores); the static
    # walk's next item mapped one item early
    dict(GLUON=True, GLUON_WS=True, BLOCK_N=64, num_stages=3, maxnreg=None, ONE_LOOP=2, OVERLAP_QK=2, PINGPONG=True,
         PERSISTENT=1, HEAVY_FIRST=True, TMA_STORE=True, AHEAD=True),
    dict(GLUON=True, GLUON_WS=True, BLOCK_N=128, num_stages=2, maxnreg=None, ONE_LOOP=2, OVERLAP_QK=2, PINGPONG=True,
         PERSISTENT=1, DYNAMIC=True, AHEAD=True, HEAVY_FIRST=True, TMA_STORE=True),
]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the Gluon prefill kernel is Hopper-only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,head_dim", [(4, 128), (2, 64), (1, 128)])
@pytest.mark.parametrize("config", GLUON_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gpu_prefill_gluon_fresh_prompts(dtype, group, head_dim, config):
    # kernels/paged_prefill_gluon.py serves fresh prompts only (has_prefix=False): lengths on and off the tile
    # grids, a one-token prompt, padding rows left alone; the launch must take the Gluon path.
    from kernels import paged_prefill_gluon

    lens = [1500, 257, 64, 1, 129, 33, 700]
    num_kv_heads = 8 // min(group, 4)
    batch = make_batch(lens, lens, group * num_kv_heads, num_kv_heads, head_dim, 16, dtype, DEVICE,
                       num_padding_tokens=5)
    assert paged_prefill_gluon.supported(batch.q, batch.k, batch.v, group, False, False, False)
    n = int(batch.query_start_loc[-1])
    out = paged_prefill(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                        head_dim**-0.5, out=poisoned_like(batch.q), config=config, k=batch.k, v=batch.v,
                        has_prefix=False)
    ref = paged_prefill_ref(batch.q[:n], batch.kv_cache, batch.block_tables, batch.seq_lens,
                            batch.query_start_loc, head_dim**-0.5)
    assert_close(out[:n], ref, dtype)
    assert out[n:].isnan().all()


@pytest.mark.parametrize("config", [dict(CHUNK_LIST=True), dict(CHUNK_LIST=True, PERSISTENT=1), None,  # the table's
                                    dict(BLOCK_M=64, num_warps=4, num_stages=3, maxnreg=None, ONE_LOOP=2,
                                         CHUNK_LIST=True, PERSISTENT=4)], ids=str)
def test_gpu_prefill_chunk_list_mixed_step(config):
    # A mixed step as the engine's graphs launch it (has_prefix, skip_single): decodes, fresh prompts and a chunk
    # after cached keys; with CHUNK_LIST only the listed sequences' rows are written, and they match the reference.
    from kernels.paged_prefill import make_chunk_list

    seq_lens = [700, 343, 900, 1, 2100, 129] + [300 + 7 * i for i in range(40)]
    q_lens = [1, 343, 1, 1, 257, 129] + [1] * 40
    batch = make_batch(seq_lens, q_lens, 32, 8, 128, 16, torch.bfloat16, DEVICE, num_padding_tokens=5)
    n = int(batch.query_start_loc[-1])
    chunks = torch.from_numpy(make_chunk_list(q_lens)).to(DEVICE)
    out = paged_prefill(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                        128**-0.5, out=poisoned_like(batch.q), config=config, k=batch.k, v=batch.v, has_prefix=True,
                        skip_single=True, max_query_len=-(-n // 16) * 16, chunk_list=chunks)
    ref = paged_prefill_ref(batch.q[:n], batch.kv_cache, batch.block_tables, batch.seq_lens,
                            batch.query_start_loc, 128**-0.5)
    assert_skip_single(out, ref, batch.query_start_loc, q_lens, torch.bfloat16)
