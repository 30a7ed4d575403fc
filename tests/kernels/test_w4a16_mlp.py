"""kernels/w4a16_mlp.py, the batch-1 W4A16 MLP in one persistent launch, against float64: x @ gate/up, silu(gate) *
up rounded as the unfused path stores it, @ down. The interpreter runs programs one after another, so it runs the
kernel's two-launch form (phases=2: the launch boundary stands in for the grid barrier); the one-launch form with
its spin-wait barrier, its co-residency cap and its L2 reads of `act` run only on a GPU (bench/w4a16.py's `mlp`
section checks them on an H200). What the interpreter does check: the same kernel body's two phases, their tile
runs across column strips, the gated epilogue, the split-K workspace of both phases left zeroed."""

import pytest
import torch

from kernels import splitk
from kernels.w4a16 import pack_int4
from kernels.w4a16_mlp import mlp, post_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def weights(k, n, group, act_order, dtype, g):
    """A [K, N] 4-bit matrix in the kernel layout and its float64 value (rows in stored order) and perm."""
    groups = -(-k // group)
    q = torch.randint(0, 16, (k, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.05 + 0.01).to(dtype)
    zeros = torch.randint(0, 16, (groups, n), generator=g)
    perm = torch.randperm(k, generator=g) if act_order else None
    w = (q - zeros[torch.arange(k) // group]).double() * scales.double()[torch.arange(k) // group]
    packed = (pack_int4(q.to(torch.int32)).to(DEV), scales.to(DEV), zeros.to(DEV, torch.uint8), group,
              perm.to(DEV, torch.int32) if perm is not None else None)
    return packed, w, perm


def reference(x, wa, pa, wb, pb, dtype):
    xs = x.double()
    gu = ((xs[:, pa] if pa is not None else xs) @ wa).to(dtype).double()
    inter = gu.shape[1] // 2
    gate, up = gu[:, :inter], gu[:, inter:]
    act = ((gate * torch.sigmoid(gate)).to(dtype).double() * up).to(dtype).double()
    return (act[:, pb] if pb is not None else act) @ wb


@pytest.mark.parametrize("hidden, inter, ga, gb, act_order, dtype, cfg", [
    (256, 384, 128, 128, False, torch.bfloat16, dict(T_A=8, BN_A=64, T_B=8, BN_B=32, num_warps=1, PER_SM=3, H2=2,
                                                   DEPTH=2)),
    (192, 320, 64, 32, True, torch.float16, dict(T_A=8, BN_A=32, T_B=4, BN_B=64, num_warps=1, PER_SM=5, H2=2)),
    (256, 200, 32, 200, False, torch.float32, dict(T_A=16, BN_A=64, T_B=8, BN_B=32, num_warps=1, PER_SM=2, H2=0,
                                                   DEPTH=0, STAGES=3)),
])
def test_w4a16_mlp_matches_float64(hidden, inter, ga, gb, act_order, dtype, cfg):
    """Group boundaries inside and across blocks (32, 64, 128, one group over K = 200), act-order on both GEMVs,
    odd K (64-row blocks for 192 and 320; 200 pads), a half strip past `inter`, runs that cross column strips
    (3-5 programs per SM on the interpreter's 4), H2 and the float32 path; bf16 / fp16 / fp32; one, two or a
    pipeline of tiles in flight (DEPTH 1, 2, 0)."""
    g = torch.Generator().manual_seed(hidden + inter)
    a, wa, pa = weights(hidden, 2 * inter, ga, act_order, dtype, g)
    b, wb, pb = weights(inter, hidden, gb, act_order, dtype, g)
    x = torch.randn(1, hidden, generator=g).to(dtype)
    out = mlp(x.to(DEV), a, b, cfg, phases=2)
    want = reference(x, wa, pa, wb, pb, dtype)
    assert out.shape == (1, hidden) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(out.double().cpu(), want, rtol=tol, atol=tol * want.abs().max().item())
    ws, cnt = splitk.workspace(torch.device(DEV), 1)
    assert not ws.any() and not cnt.any(), "both phases must leave the split-K workspace zeroed"


@pytest.mark.parametrize("q_dim, hidden, inter, n_qkv, group, act_order, dtype, cfg", [
    (256, 192, 320, 320, 64, False, torch.bfloat16, dict(T_O=8, BN_O=32, T_A=8, BN_A=64, T_B=8, BN_B=64, T_Q=8,
                                                         BN_Q=64, num_warps=1, PER_SM=3, H2=2)),
    (128, 256, 384, 192, 32, True, torch.float16, dict(T_O=4, BN_O=64, T_A=8, BN_A=32, T_B=16, BN_B=32, T_Q=8,
                                                       BN_Q=32, num_warps=1, PER_SM=5, H2=0, DEPTH=2)),
    # 5 norm slices of 128 columns over 4 programs (one program per SM of the interpreter's 4): program 0 takes two
    (128, 640, 128, 128, 128, False, torch.bfloat16, dict(T_O=8, BN_O=128, T_A=8, BN_A=64, T_B=8, BN_B=128, T_Q=8,
                                                          BN_Q=64, num_warps=1, PER_SM=1, H2=2, DEPTH=0, STAGES=3)),
])
@pytest.mark.parametrize("with_front", [False, True], ids=["tail", "tail+front"])
def test_w4a16_post_attention_matches_float64(q_dim, hidden, inter, n_qkv, group, act_order, dtype, cfg, with_front):
    """o_proj, the residual add, the Llama RMSNorm and the MLP in one kernel (its launch-per-phase form here), and
    with the next layer's front (residual add, its input norm, its qkv projection): the output and the residual
    (updated in place) against float64 with each step rounded to the model dtype where the unfused layers store it
    (o, h = o + r, the normed row, w * normed, gate/up, SwiGLU, down, the next h, its normed row). hidden 192 is not
    a power of two (the norm's row is masked) and takes 64-row blocks; norm slices of 128 columns over several
    programs."""
    g = torch.Generator().manual_seed(q_dim + hidden)
    o, wo, po = weights(q_dim, hidden, group, act_order, dtype, g)
    a, wa, pa = weights(hidden, 2 * inter, group, act_order, dtype, g)
    b, wb, pb = weights(inter, hidden, group, act_order, dtype, g)
    qk, wq, pq = weights(hidden, n_qkv, group, act_order, dtype, g)
    attn = torch.randn(1, q_dim, generator=g).to(dtype)
    res = torch.randn(1, hidden, generator=g).to(dtype)
    nw = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    nw2 = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    eps = 1e-5

    def add_norm(y, r, w):
        h = (y.double() + r.double()).to(dtype).double()
        normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        return (w.double() * normed.double()).to(dtype), h

    att = attn.double()
    x, h = add_norm(((att[:, po] if po is not None else att) @ wo).to(dtype), res, nw)
    want = reference(x, wa, pa, wb, pb, dtype)
    r_dev = res.to(DEV)
    front = (nw2.to(DEV), eps, qk) if with_front else None
    out = post_attention(attn.to(DEV), r_dev, o, nw.to(DEV), eps, a, b, cfg, phases=2, front=front)
    # bf16: a gate/up value one rounding off in the kernel moves its SwiGLU output by up to 2^-7, and 320-384 such
    # terms add up in down: 3% of the largest output (a wrong tile or a missed phase is O(1))
    tol = 3e-3 if dtype == torch.float16 else 3e-2
    if with_front:
        x2, h = add_norm(want.to(dtype), h.to(dtype), nw2)
        want = (x2.double()[:, pq] if pq is not None else x2.double()) @ wq
        assert out.shape == (1, n_qkv)
    torch.testing.assert_close(r_dev.cpu().double(), h, rtol=tol, atol=tol * h.abs().max().item())  # o's rounding
    torch.testing.assert_close(out.double().cpu(), want, rtol=tol, atol=tol * want.abs().max().item())
    ws, cnt = splitk.workspace(torch.device(DEV), 1)
    assert not ws.any() and not cnt.any(), "every phase must leave the split-K workspace zeroed"


def test_w4a16_mlp_refuses_bad_shapes_and_the_barrier_off_cuda():
    g = torch.Generator().manual_seed(1)
    a, _, _ = weights(128, 2 * 64, 128, False, torch.float32, g)
    b, _, _ = weights(64, 128, 64, False, torch.float32, g)
    x = torch.randn(1, 128, generator=g)
    with pytest.raises(ValueError, match=r"x \[1, hidden\]"):
        mlp(torch.randn(2, 128), a, b)
    with pytest.raises(ValueError, match="down N = hidden"):
        mlp(x, a, (b[0][:, :64], b[1][:, :64], b[2][:, :64], 64, None))
    if DEV == "cpu":
        with pytest.raises(ValueError, match="needs CUDA"):
            mlp(x, a, b, phases=1)


@pytest.mark.parametrize("flags", [("FUSE_MLP",), ("FUSE_POST",), ("FUSE_POST", "FUSE_FRONT")],
                         ids=["mlp", "post", "post+front"])
def test_w4a16_llama_layer_tail_in_one_launch_at_batch_1(monkeypatch, flags):
    """A 4-bit Llama decoding one token with FUSE_MLP (each layer's gate/up projection runs the whole MLP and returns an
    MLPOutput), FUSE_POST (each layer's o projection runs o, the residual add, the post-attention norm and the MLP
    and returns a LayerOutput) or also FUSE_FRONT (layer 0's launch also runs layer 1's input norm and qkv; layer 1
    skips both): kernels/w4a16_mlp.py in its launch-per-phase form here. The logits equal the per-GEMV Triton path's
    (norm kernel, gate/up with SwiGLU in its epilogue, then down) and the dequantize-then-matmul reference's."""
    from services.engine.attention.metadata import AttentionMetadata
    from services.engine.attention.torch_backend import TorchAttentionBackend
    from services.engine.model.quantization import int4
    from services.engine.model.registry import build_model
    from tests.kernels.test_fused_model import LLAMA

    from kernels import w4a16_mlp

    hf = dict(LLAMA, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False,
                                          "desc_act": False})
    calls, fronts = [], []
    entry = "mlp" if flags == ("FUSE_MLP",) else "post_attention"
    real = getattr(w4a16_mlp, entry)

    def spy(*a, **k):
        calls.append(a[0].shape)
        fronts.append(k.get("front") is not None)
        return real(*a, **k)

    monkeypatch.setattr(w4a16_mlp, entry, spy)
    monkeypatch.setitem(w4a16_mlp.TUNED, (LLAMA["hidden_size"], LLAMA["intermediate_size"]),
                        dict(T_O=8, BN_O=32, T_A=8, BN_A=64, T_B=8, BN_B=32, num_warps=1, PER_SM=3, H2=2))
    outs = {}
    for name, kernels, fuse in (("reference", False, False), ("per-GEMV", True, False), ("one launch", True, True)):
        monkeypatch.setattr(int4, "_kernels", lambda x, on=kernels: on)
        for flag in flags:
            monkeypatch.setattr(int4, flag, fuse)
        model = build_model(hf, TorchAttentionBackend(), torch.float32, torch.device(DEV))
        model.init_dummy(seed=6)
        model.set_fused_elementwise(kernels)
        kv = [torch.zeros(2, 8, 4, 2, 16, device=DEV) for _ in range(2)]
        i32 = dict(dtype=torch.int32, device=DEV)
        meta = AttentionMetadata(
            num_seqs=1, num_tokens=1, query_start_loc=torch.tensor([0, 1], **i32), seq_lens=torch.tensor([1], **i32),
            block_tables=torch.tensor([[0, 1]], **i32), slot_mapping=torch.tensor([0], device=DEV), max_query_len=1,
            max_seq_len=1, query_lens_cpu=[1], seq_lens_cpu=[1])
        calls.clear()
        fronts.clear()
        outs[name] = model.logits(model.forward(torch.tensor([7], device=DEV), torch.tensor([0], device=DEV), kv, meta))
        assert len(calls) == (LLAMA["num_hidden_layers"] if fuse else 0)
        if fuse and "FUSE_FRONT" in flags:  # every layer's launch but the last runs the next layer's front
            assert fronts == [True] * (LLAMA["num_hidden_layers"] - 1) + [False]
    torch.testing.assert_close(outs["one launch"], outs["per-GEMV"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["one launch"], outs["reference"], atol=1e-4, rtol=1e-4)
