"""x's f16x2 pairs made by the norm (kernels/fused_norm.py PAIRS) and read by the H2 gemv3 (XP): the layout, and the
GEMV's bits with and without them (Triton interpreter)."""

import pytest
import torch

from kernels import w4a16 as w4
from kernels.fused_norm import add_rms_norm
from kernels.w4a16 import pack_int4
from kernels.w4a16_half2 import pairs_index, x_pairs_of

DEV = torch.device("cpu")


def test_pairs_index_layout():
    """Each input k lands once; a PAIR tile's even words then its odd words are consecutive pairs."""
    seen = {pairs_index(k) for k in range(256)}
    assert len(seen) == 256 and {i for i, _ in seen} == set(range(128))
    assert [pairs_index(128 + 16 * 1 + p) for p in (0, 2, 4, 6)] == [(64 + 16 + r, 0) for r in range(4)]
    assert [pairs_index(128 + 16 * 1 + p) for p in (1, 3, 5, 7)] == [(64 + 16 + 8 + r, 0) for r in range(4)]
    assert pairs_index(16 * 5 + 3) == (16 + 8 + 1, 1)  # nibble row 5 = row 1's high half


@pytest.mark.parametrize("hidden, residual", [(512, True), (4096, False), (384, True)])  # 384: scattered stores
def test_the_norm_writes_its_outputs_pairs(hidden, residual):
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(1, hidden, generator=g).to(torch.bfloat16)
    r = torch.randn(1, hidden, generator=g).to(torch.bfloat16) if residual else None
    w = torch.randn(hidden, generator=g).to(torch.bfloat16)
    plain = add_rms_norm(x, r.clone() if residual else None, w, 1e-5)
    out, pairs = add_rms_norm(x, r.clone() if residual else None, w, 1e-5, pairs=True)
    assert torch.equal(out, plain)
    assert torch.equal(pairs, x_pairs_of(out))
    halves = pairs.reshape(-1).view(torch.float16)
    k = torch.arange(hidden)
    idx = torch.tensor([2 * i + h for i, h in map(pairs_index, k.tolist())])
    assert torch.equal(halves[idx], out.reshape(-1).float().to(torch.float16))
    with pytest.raises(ValueError, match="multiple of 128"):
        add_rms_norm(torch.zeros(1, 100, dtype=torch.bfloat16), None, torch.ones(100, dtype=torch.bfloat16), 1e-5,
                     pairs=True)


@pytest.mark.parametrize("k, n, group, split, t, bn, gated", [
    (512, 256, 128, 3, 8, 128, False), (512, 520, 128, 2, 16, 256, False), (512, 256, 64, 1, 8, 64, False),
    (1024, 192, 128, 5, 8, 64, True), (512, 128, 128, 2, 16, 64, True)])
def test_gemv3_reads_the_pairs_with_the_same_bits(k, n, group, split, t, bn, gated):
    g = torch.Generator().manual_seed(k + n)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    q = torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)
    s = (torch.rand(k // group, n, generator=g) * 0.01 + 0.002).to(torch.bfloat16)
    z = torch.randint(0, 16, (k // group, n), generator=g).to(torch.uint8)
    qw = pack_int4(q)
    w4.reserve_workspace(DEV, n)
    cfg = dict(KERNEL="gemv3", T=t, BLOCK_N=bn, num_warps=1, num_stages=1, SPLIT_K=split, PDL=0, H2=2)
    want = w4.w4a16(x, qw, s, z, group, config=cfg, gated=gated)
    assert torch.equal(w4.w4a16(x, qw, s, z, group, config=cfg, gated=gated, x_pairs=x_pairs_of(x)), want)
    wrong = w4.w4a16(x, qw, s, z, group, config=cfg, gated=gated, x_pairs=x_pairs_of(x * 2))
    # the pairs are what it reads, where H2 runs (a group covering the 128-row block); group 64: the float32 decode
    assert torch.equal(wrong, want) == (group < 128)
    # without H2 the pairs are not read: the float32 decode, as before
    f32 = dict(cfg, H2=0)
    assert torch.equal(w4.w4a16(x, qw, s, z, group, config=f32, gated=gated, x_pairs=x_pairs_of(x * 2)),
                       w4.w4a16(x, qw, s, z, group, config=f32, gated=gated))


@pytest.mark.parametrize("split, bn", [(3, 64), (1, 128)])
def test_gated_gemv3_makes_the_pairs_of_its_output(split, bn):
    """gate/up's SwiGLU epilogue (make_pairs) writes its output's pairs, which the down GEMV then reads with the same
    bits as from the output itself."""
    g = torch.Generator().manual_seed(split)
    k, inter = 256, 256
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    q = torch.randint(0, 16, (k, 2 * inter), generator=g, dtype=torch.int32)
    s = (torch.rand(k // 128, 2 * inter, generator=g) * 0.01 + 0.002).to(torch.bfloat16)
    z = torch.randint(0, 16, (k // 128, 2 * inter), generator=g).to(torch.uint8)
    w4.reserve_workspace(DEV, 2 * inter)
    cfg = dict(KERNEL="gemv3", T=8, BLOCK_N=bn, num_warps=1, num_stages=1, SPLIT_K=split, PDL=0, H2=2)
    y, pairs = w4.w4a16(x, pack_int4(q), s, z, 128, config=cfg, gated=True, make_pairs=True)
    assert torch.equal(y, w4.w4a16(x, pack_int4(q), s, z, 128, config=cfg, gated=True))
    assert torch.equal(pairs, x_pairs_of(y))
    qd = torch.randint(0, 16, (inter, 64), generator=g, dtype=torch.int32)
    sd = (torch.rand(inter // 128, 64, generator=g) * 0.01).to(torch.bfloat16)
    zd = torch.full((inter // 128, 64), 8, dtype=torch.uint8)
    down = dict(cfg, BLOCK_N=64, SPLIT_K=2)
    assert torch.equal(w4.w4a16(y, pack_int4(qd), sd, zd, 128, config=down, x_pairs=pairs),
                       w4.w4a16(y, pack_int4(qd), sd, zd, 128, config=down))
    # not gated, or an output that is not whole 128-blocks: no pairs, y alone
    assert isinstance(w4.w4a16(x, pack_int4(q), s, z, 128, config=cfg, make_pairs=True), torch.Tensor)
