"""The fused-MoE Triton kernel (interpreter on CPU) against its torch reference: routings that leave experts
with no tokens, one token and every token; biases; both activations; the alignment's invariants."""

import pytest
import torch

from kernels.fused_moe import fused_moe, fused_moe_ref, moe_align

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _weights(E, H, inter, dtype, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) / H ** 0.5).to(DEV, dtype)
    w2 = (torch.randn(E, H, inter, generator=g) / inter ** 0.5).to(DEV, dtype)
    b13 = (0.1 * torch.randn(E, 2 * inter, generator=g)).to(DEV, dtype) if bias else None
    return w13, w2, b13


def _routing(kind: str, T: int, E: int, k: int, g):
    """topk_ids [T, k] (distinct per row) shaped to hit the edge cases by name."""
    if kind == "random":
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    elif kind == "all_to_two":  # experts 0 and 1 get every token; the others none
        ids = torch.tensor([[0, 1]] * T)[:, :k]
    elif kind == "one_token_each":  # token t -> experts (2t, 2t+1): each hit expert has exactly one token
        ids = torch.arange(T * k).view(T, k) % E
    else:
        raise AssertionError(kind)
    w = torch.rand(T, k, generator=g)
    return (w / w.sum(1, keepdim=True)).to(DEV), ids.to(DEV)


@pytest.mark.parametrize("dtype,kind,T,E,k", [
    (torch.float32, "random", 7, 4, 2), (torch.float16, "random", 7, 4, 2),
    (torch.float32, "all_to_two", 5, 6, 2),  # experts 0 and 1 get every token, the rest none
    (torch.float32, "one_token_each", 3, 8, 2),  # every expert hit gets exactly one token
    (torch.float32, "random", 19, 8, 3)])
def test_fused_moe_matches_reference(dtype, kind, T, E, k):
    H, inter = 48, 40  # not multiples of the tiles: masks on K and N
    g = torch.Generator().manual_seed(T * E)
    w13, w2, _ = _weights(E, H, inter, dtype, seed=E)
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    tw, ids = _routing(kind, T, E, k, g)
    got = fused_moe(x, w13, w2, tw, ids, config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32))
    want = fused_moe_ref(x, w13, w2, tw, ids)
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])


def test_fused_moe_gpt_oss_activation_with_bias_and_larger_tiles():
    T, E, k, H, inter = 6, 4, 2, 32, 24
    g = torch.Generator().manual_seed(1)
    w13, w2, b13 = _weights(E, H, inter, torch.float32, seed=2, bias=True)
    x = 3 * torch.randn(T, H, generator=g).to(DEV)  # large enough that the clamps at +-limit bite
    tw, ids = _routing("random", T, E, k, g)
    got = fused_moe(x, w13, w2, tw, ids, "swiglu_oai", b13, alpha=1.702, limit=1.5,
                    config=dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16))
    want = fused_moe_ref(x, w13, w2, tw, ids, "swiglu_oai", b13, alpha=1.702, limit=1.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    gu = x @ w13[ids[0, 0]].t() + b13[ids[0, 0]]
    assert (gu[0, :inter] > 1.5).any() and (gu[0, inter:].abs() > 1.5).any(), "the clamps were not exercised"


def test_moe_align_groups_slots_by_expert_in_padded_blocks():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2]])
    sorted_ids, expert_ids, num_padded = moe_align(ids, num_experts=5, block_m=4)
    n = ids.numel()
    assert int(num_padded) == 16  # experts 0 (2 slots), 1, 2, 3 (4 slots): one 4-row block each; 4 unused
    blocks = sorted_ids[: int(num_padded)].view(-1, 4)
    flat = ids.reshape(-1)
    for b, e in zip(blocks, expert_ids[: blocks.shape[0]]):
        real = b[b < n]
        assert (flat[real.long()] == e).all()
    assert sorted(sorted_ids[sorted_ids < n].tolist()) == list(range(n))
    assert expert_ids.tolist()[:4] == [0, 1, 2, 3]
