"""The Triton W4A16 kernels (GEMV and tensor-core, both split-K reductions) against x @ ((q - zero) * scale)
computed in float64 from the unpacked integers: group boundaries inside and across blocks and slabs,
act-order permutations, odd K and N, fp32 / fp16 / bf16."""

import pytest
import torch

from kernels import splitk
from kernels.w4a16 import pack_int4, pick_config, unpack_int4, w4a16, w4a16_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def pack(q: torch.Tensor) -> torch.Tensor:
    """[K, N] 0..15 -> the kernel layout, written out by hand: blocks of R = 128 rows (64 when K % 128 is
    1..64), row r = R b + (R/8) j + p goes to nibble j of word (R/8) b + p."""
    k, n = q.shape
    rows = 64 if 0 < k % 128 <= 64 else 128
    out = torch.zeros(-(-k // rows) * rows // 8, n, dtype=torch.int64)
    for row in range(k):
        b, r = divmod(row, rows)
        j, p = divmod(r, rows // 8)
        out[rows // 8 * b + p] |= q[row].long() << (4 * j)
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


def case(m, k, n, group, act_order, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    q = torch.randint(0, 16, (k, n), generator=g)
    scales = torch.rand(groups, n, generator=g) * 0.05 + 0.01
    zeros = torch.randint(0, 16, (groups, n), generator=g)
    x = torch.randn(m, k, generator=g)
    perm = torch.randperm(k, generator=g) if act_order else None
    # Row r of the stored matrix is input feature perm[r] (rows sorted by group at load).
    w = (q - zeros[torch.arange(k) // group]).double() * scales.to(dtype).double()[torch.arange(k) // group]
    xs = x.to(dtype).double()
    ref = (xs[:, perm] if perm is not None else xs) @ w
    args = (x.to(DEV, dtype), pack(q).to(DEV), scales.to(DEV, dtype), zeros.to(DEV, torch.uint8), group,
            perm.to(DEV, torch.int32) if perm is not None else None)
    return args, ref


def close(out, ref, dtype):
    tol = 1e-5 if dtype == torch.float32 else 3e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def assert_workspace_zero():
    ws, cnt = splitk.workspace(torch.device(DEV), 1)
    assert not ws.any() and not cnt.any(), "split-K must leave its workspace zeroed for the next call"


GEMV = dict(KERNEL="gemv", BLOCK_N=32, num_warps=4, num_stages=1)
MMA = dict(KERNEL="mma", BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)

CASES = [
    # m, k, n, group, act_order, split, atomic
    (3, 256, 64, 128, False, 2, True),    # a block per group: the scale comes out of the block's sum
    (3, 256, 64, 32, False, 2, False),    # four groups per block, one per 16-row slab; partial-sum split-K
    (5, 300, 40, 24, True, 3, True),      # act-order, groups that straddle slabs, odd K in 64-row blocks
    (4, 100, 37, 100, False, 1, True),    # K < one block, odd N, one group over all of K
    (1, 384, 48, 64, True, 3, True),      # decode: M = 1, split-K 3 with act-order
]


@pytest.mark.parametrize("m, k, n, group, act_order, split, atomic", CASES)
@pytest.mark.parametrize("kernel", ["gemv1", "gemv2", "gemv3", "gemv4", "gemv", "mma-slabs", "mma-stacked", "dequant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_w4a16_matches_float64(m, k, n, group, act_order, split, atomic, kernel, dtype):
    args, ref = case(m, k, n, group, act_order, dtype, seed=m * k + n)
    if kernel in ("gemv1", "gemv2", "gemv3", "gemv4"):  # batch-1 decode's kernels: the first row alone
        args, ref, m = (args[0][:1],) + args[1:], ref[:1], 1
    cfg = {"gemv1": dict(GEMV, KERNEL="gemv1"), "gemv2": dict(GEMV, KERNEL="gemv2"),
           "gemv3": dict(GEMV, KERNEL="gemv3", T=8), "gemv4": dict(GEMV, KERNEL="gemv4", T=8),
           "gemv": dict(GEMV, BLOCK_M=8),
           "dequant": dict(KERNEL="dequant", BLOCK_N=32), "mma-slabs": dict(MMA, SLABS=True),
           "mma-stacked": dict(MMA, SLABS=False)}[kernel]
    # gemv4 splits by programs per SM (4 SMs on CPU), not by K-slices, and always sums through the workspace
    cfg = dict(cfg, PER_SM=split) if kernel == "gemv4" else dict(cfg, SPLIT_K=split, ATOMIC=atomic)
    if kernel in ("gemv3", "gemv4") and group not in (8, 16, 32, 64) and group % 128 and group < k:  # refused
        with pytest.raises(ValueError, match=f"{kernel} kernel takes group sizes .* got {group}"):
            w4a16(*args, config=cfg)
        return
    out = w4a16(*args, config=cfg)
    assert out.dtype == dtype and out.shape == (m, n)
    close(out, ref, dtype)
    assert_workspace_zero()
    close(w4a16_reference(*args), ref, dtype)


def test_w4a16_gemv_bfloat16():
    """The GEMV kernel multiplies in float32 registers, so bf16 runs in the interpreter too (its bf16 dot
    does not: the tensor-core kernel is checked in bf16 by bench/quant.py on the GPU)."""
    args, ref = case(1, 256, 40, 128, False, torch.bfloat16, seed=7)
    close(w4a16(*args, config=dict(GEMV, BLOCK_M=1, SPLIT_K=2)), ref, torch.bfloat16)
    assert_workspace_zero()


def test_w4a16_mma_several_m_tiles_share_the_split_k_workspace():
    """M over two tiles and split-K: each (m, n) tile has its own counter, and every sum lands once."""
    args, ref = case(20, 256, 40, 64, False, torch.float32, seed=3)
    close(w4a16(*args, config=dict(MMA, SLABS=True, SPLIT_K=2)), ref, torch.float32)
    assert_workspace_zero()


@pytest.mark.parametrize("k", [64, 200, 300])  # 64-row blocks, a partial 128-row block, partial 64-row block
def test_pack_int4_is_the_kernel_layout(k):
    q = torch.randint(0, 16, (k, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack_int4(q), pack(q))
    assert torch.equal(unpack_int4(pack_int4(q), k), q.int())


def test_w4a16_default_configs():
    # Batch-1 decode: gemv3 where it takes the group size; a few rows: tensor cores with split-K (on a 4-SM
    # stand-in); large M dequantizes once for cuBLAS.
    assert pick_config(1, 64, 4096, 128, torch.device("cpu"))["KERNEL"] == "gemv3"
    assert pick_config(1, 64, 4096, 40, torch.device("cpu"))["KERNEL"] == "mma"
    assert pick_config(2, 64, 4096, 128, torch.device("cpu"))["KERNEL"] == "mma"
    assert pick_config(256, 4096, 4096, 128, torch.device("cpu"))["KERNEL"] == "dequant"
    for m in (1, 2, 70):
        args, ref = case(m, 1024, 32, 128, False, torch.float32)
        close(w4a16(*args), ref, torch.float32)
        assert_workspace_zero()


def test_w4a16_refuses_mismatched_shapes():
    args, _ = case(2, 64, 32, 32, False, torch.float32)
    x, qw, s, z, group, _ = args
    with pytest.raises(ValueError, match="qweight"):
        w4a16(x, qw[:-1], s, z, group)
    with pytest.raises(ValueError, match="scales and zeros"):
        w4a16(x, qw, s, z, 16)
    with pytest.raises(ValueError, match="GEMV kernel takes M <= BLOCK_M"):
        w4a16(x, qw, s, z, group, config=dict(GEMV, BLOCK_M=1))
    with pytest.raises(ValueError, match="gemv1 kernel takes M = 1"):
        w4a16(x, qw, s, z, group, config=dict(GEMV, KERNEL="gemv1"))
    with pytest.raises(ValueError, match="gemv2 kernel takes M = 1"):
        w4a16(x, qw, s, z, group, config=dict(GEMV, KERNEL="gemv2"))


def test_w4a16_gemv_without_prefetch():
    args, ref = case(3, 384, 40, 128, True, torch.float32, seed=13)
    close(w4a16(*args, config=dict(GEMV, BLOCK_M=4, PREFETCH=False, SPLIT_K=2)), ref, torch.float32)
    assert_workspace_zero()


@pytest.mark.parametrize("mode", [1, 2])
def test_w4a16_forced_more_general_group_mode_gives_the_same_product(mode):
    """bench/quant.py may force per-slab or per-row scales where a block lies in one group."""
    args, ref = case(2, 256, 40, 128, False, torch.float32, seed=11)
    close(w4a16(*args, config=dict(GEMV, BLOCK_M=2, GROUP_MODE=mode, SPLIT_K=1)), ref, torch.float32)
    close(w4a16(*args, config=dict(MMA, SLABS=True, GROUP_MODE=mode, SPLIT_K=1)), ref, torch.float32)


@pytest.mark.parametrize("unroll, group, mode", [(2, 128, None), (2, 40, None), (2, 128, 2), (1, 128, 2)])
def test_w4a16_gemv2_tiles_of_several_blocks(unroll, group, mode):
    """gemv2 with two blocks per tile: 5 blocks over split-K 2 (per-split rounded up to whole tiles, the last
    tile half past K), per-block scales, per-row scales (a group size that cuts blocks, or forced), act-order;
    bf16 x. PDL asks for a GPU-only launch and is ignored here (bench/w4a16.py checks it on the GPU)."""
    args, ref = case(1, 600, 40, group, True, torch.bfloat16, seed=unroll + group)
    cfg = dict(GEMV, KERNEL="gemv2", UNROLL=unroll, SPLIT_K=2, PDL=1)
    if mode is not None:
        cfg["GROUP_MODE"] = mode
    close(w4a16(*args, config=cfg), ref, torch.bfloat16)
    assert_workspace_zero()


@pytest.mark.parametrize("k, group, t, act", [(320, 16, 8, True), (1088, 64, 16, True), (1000, 128, 8, True),
                                               (512, 32, 8, False), (384, 128, 16, False)])
def test_w4a16_gemv3_groups_inside_a_block(k, group, t, act):
    """gemv3 scales each group's sums as the group ends: one group per nibble (16), per half block (64,
    in 64-row blocks where T is cut to 8), per block with the last block past K; act-order, bf16. Without
    act-order and with K a multiple of the block, bf16 x is read as int32 pairs (XPAIR)."""
    args, ref = case(1, k, 40, group, act, torch.bfloat16, seed=k)
    close(w4a16(*args, config=dict(GEMV, KERNEL="gemv3", T=t, SPLIT_K=3, PDL=2)), ref, torch.bfloat16)
    assert_workspace_zero()


@pytest.mark.parametrize("k, n, group, per_sm, act", [(256, 96, 128, 1, False), (256, 96, 32, 3, False),
                                                       (384, 40, 64, 5, True), (1000, 70, 128, 2, True),
                                                       (512, 64, 16, 7, False)])
def test_w4a16_gemv4_runs_that_cross_column_strips(k, n, group, per_sm, act):
    """gemv4's programs take equal runs of tiles numbered strip by strip (4 SMs on CPU): runs that start or end
    inside a strip and strips shared by 2-3 programs each land once, through the workspace; bf16 (XPAIR where
    there is no act-order and K is a multiple of the block), groups inside and across blocks, odd N and K."""
    args, ref = case(1, k, n, group, act, torch.bfloat16, seed=k + n)
    close(w4a16(*args, config=dict(KERNEL="gemv4", T=8, BLOCK_N=32, num_warps=1, PER_SM=per_sm, PDL=2)), ref,
          torch.bfloat16)
    assert_workspace_zero()


G4S = dict(KERNEL="gemv4", T=8, num_warps=1)


@pytest.mark.parametrize("k, inter, group, cfgs", [
    (256, 96, 128, [dict(G4S, BLOCK_N=64, PER_SM=3), dict(GEMV, KERNEL="gemv3", T=8, BLOCK_N=64, SPLIT_K=3)]),
    (384, 200, 64, [dict(G4S, BLOCK_N=128, PER_SM=2), dict(GEMV, KERNEL="gemv3", SPLIT_K=2, ATOMIC=False)]),
    (512, 64, 32, [dict(G4S, BLOCK_N=32, PER_SM=5), dict(GEMV, KERNEL="gemv3", SPLIT_K=1)])])
def test_w4a16_gated_gives_silu_of_gate_times_up(k, inter, group, cfgs):
    """A SwiGLU MLP's gate/up projection with `gated`: gemv4 takes the same columns of both halves per strip and
    writes silu(gate) * up (odd strip counts, a half strip past `inter`), and so does gemv3 (split or not; the
    split that completes a strip writes it); gemv3 with partial-sum split-K runs silu_mul after. Against float64
    (gate and up rounded to bf16 first, as the unfused path stores them)."""
    args, ref = case(1, k, 2 * inter, group, False, torch.bfloat16, seed=k + inter)
    gu = ref.to(torch.bfloat16).double()
    gate, up = gu[:, :inter], gu[:, inter:]
    want = (gate * torch.sigmoid(gate)).to(torch.bfloat16).double() * up
    for cfg in cfgs:
        out = w4a16(*args, config=cfg, gated=True)
        assert out.shape == (1, inter) and out.dtype == torch.bfloat16
        close(out, want, torch.bfloat16)
        assert_workspace_zero()


@pytest.mark.parametrize("k, n, group, act, dtype", [(256, 96, 128, False, torch.bfloat16),
                                                     (384, 40, 64, True, torch.bfloat16),
                                                     (300, 70, 16, True, torch.float16)])
def test_w4a16_gemv4_fold_takes_the_zero_point_off_per_group(k, n, group, act, dtype):
    """gemv4 and gemv3 with FOLD sum (2^e + q) x with e = 11 or 7 and take (2^e + z) sum(x) off per group: within the
    dtype's tolerance of float64 (groups of one nibble to a whole block; XPAIR and act-order; gated too)."""
    args, ref = case(1, k, n, group, act, dtype, seed=3 * k + n)
    for cfg in (dict(KERNEL="gemv4", T=8, BLOCK_N=32, num_warps=1, PER_SM=3, FOLD=True),
                dict(GEMV, KERNEL="gemv3", FOLD=True, SPLIT_K=2)):
        close(w4a16(*args, config=cfg), ref, dtype)
        assert_workspace_zero()
    gu = ref.to(dtype).double()
    gate, up = gu[:, :n // 2], gu[:, n // 2:]
    close(w4a16(*args, config=cfg, gated=True), (gate * torch.sigmoid(gate)).to(dtype).double() * up, dtype)
    assert_workspace_zero()


@pytest.mark.parametrize("k, n, group, act, dtype", [(256, 96, 128, False, torch.bfloat16),
                                                     (384, 40, 128, True, torch.float16),
                                                     (300, 70, 300, False, torch.bfloat16),
                                                     (256, 64, 32, False, torch.bfloat16)])
def test_w4a16_half2_decode_matches_float64(k, n, group, act, dtype):
    """H2 (kernels/w4a16_half2.py): (q - z) from the f16 magic-number decode, products and 4- or 8-term sums in
    float16, then float32; gemv3 and gemv4, one or two words per block (two need bf16 x pairs: act-order and fp16
    fall back to one), a group over all of K with K past the last block, and group 32 (inside a block: H2 is off
    and the float32 path runs). The interpreter runs the PTX's float16 stand-in; bench/w4a16.py checks the PTX."""
    args, ref = case(1, k, n, group, act, dtype, seed=5 * k + n)
    for cfg in (dict(KERNEL="gemv4", T=8, BLOCK_N=32, num_warps=1, PER_SM=3, H2=2),
                dict(GEMV, KERNEL="gemv3", T=8, SPLIT_K=2, H2=2), dict(GEMV, KERNEL="gemv3", T=16, SPLIT_K=1, H2=1)):
        close(w4a16(*args, config=cfg), ref, dtype)
        assert_workspace_zero()
    gu = ref.to(dtype).double()
    gate, up = gu[:, :n // 2], gu[:, n // 2:]
    close(w4a16(*args, config=cfg, gated=True), (gate * torch.sigmoid(gate)).to(dtype).double() * up, dtype)
    assert_workspace_zero()


def test_w4a16_half2_holds_large_activations():
    """H2's float16 sums carry (q - z) / 64 (kernels/w4a16_half2.py): activations in the thousands, one at 30,000,
    stay finite and within bf16's tolerance."""
    args, ref = case(1, 256, 48, 128, False, torch.bfloat16, seed=9)
    x = (args[0].float() * 3000).to(torch.bfloat16)
    x[0, 7] = 30000.0
    ref = x.double() @ dequant_f64(args)
    out = w4a16(x, *args[1:], config=dict(GEMV, KERNEL="gemv3", SPLIT_K=2, H2=2))
    assert torch.isfinite(out).all()
    close(out, ref, torch.bfloat16)


def dequant_f64(args):
    _, qw, s, z, group, _ = args
    g = torch.arange(256) // group
    return (unpack_int4(qw.cpu(), 256) - z.cpu()[g].int()).double() * s.cpu()[g].double()


def test_half2_mode_falls_back_where_it_cannot_run():
    from kernels.w4a16_stream import half2_mode

    assert half2_mode(2, 8, torch.bfloat16, True) == (2, True)
    assert half2_mode(2, 8, torch.bfloat16, False) == (1, False)  # no x pairs (act-order, fp16, odd K)
    assert half2_mode(1, 8, torch.bfloat16, True) == (1, False)
    assert half2_mode(2, 4, torch.bfloat16, True) == (0, True)  # a group inside the block
    assert half2_mode(2, 8, torch.float32, False) == (0, False)
    with pytest.raises(ValueError, match="H2 must be 0, 1 or 2"):
        half2_mode(3, 8, torch.bfloat16, True)
