"""quantization/int4_ahead.py: the learnt call order, where prefetches fork and where they join (CPU, fake streams)."""

import pytest
import torch

from services.engine.model.quantization import int4_ahead


class QKVParallelLinear(torch.nn.Module):
    def __init__(self, mb, k=4096):
        super().__init__()
        self.qweight = torch.empty(mb << 10, 256, dtype=torch.int32)  # mb MiB
        self.in_k = k


class RowParallelLinear(QKVParallelLinear):
    pass


class MergedColumnParallelLinear(QKVParallelLinear):
    pass


class Recorder:
    def __init__(self):
        self.log, self.n = [], 0

    def fork(self, fn):
        self.n += 1
        fn()
        self.log.append(("fork", self.n))
        return self.n

    def join(self, ev):
        self.log.append(("join", ev))


def model(layers=2):
    out = []
    for _ in range(layers):  # the 8B's sizes in MiB, rounded: qkv 12, o 8, gate_up 56, down 28
        out += [QKVParallelLinear(12), RowParallelLinear(8, 256), MergedColumnParallelLinear(56),
                RowParallelLinear(28, 14336)]
    return out


def forward(ahead, rec, layers, names):
    for layer in layers:
        ahead.before(layer)
        rec.log.append(("gemv", names[id(layer)]))
        ahead.after(layer)


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("dist,forks", [
    ({"o": (1, 1.0)}, [("o0", "qkv0"), ("o1", "qkv1")]),
    ({"o": (1, 1.0), "qkv": (2, 1.0)}, [("o0", "qkv0"), ("qkv1", "gate_up0"), ("o1", "qkv1")]),
    ({"qkv": (1, 1.0)}, [("qkv1", "down0")]),
    ({"o": (1, 1.0), "gate_up": (2, 0.25)}, [("o0", "qkv0"), ("gate_up0", "qkv0"), ("o1", "qkv1"), ("gate_up1", "qkv1")]),
    ({"gate_up": (2, 1.0), "down": (1, 1.0)}, [("down0", "gate_up0"), ("down1", "gate_up1")]),  # gate_up: > MAX_BYTES
])
def test_forks_after_the_learnt_predecessor_and_joins_before_the_target(monkeypatch, dist, forks, late):
    monkeypatch.setattr(int4_ahead, "DIST", dist)
    monkeypatch.setattr(int4_ahead, "JOIN_LATE", late)
    layers = model()
    names = {id(m): f"{k}{i // 4}" for i, (m, k) in enumerate(zip(layers, ["qkv", "o", "gate_up", "down"] * 2))}
    rec, fetched = Recorder(), []
    ahead = int4_ahead.Ahead(launch=lambda t, f: fetched.append(names[id(t)]), streams=rec)
    forward(ahead, rec, layers, names)  # learns the order: nothing forked yet
    assert fetched == [] and all(e[0] == "gemv" for e in rec.log)
    for _ in range(2):  # the next forwards (the second as a graph capture would see it)
        rec.log, fetched[:] = [], []
        forward(ahead, rec, layers, names)
        assert fetched == [t for t, _ in forks]
        gemvs = [e[1] for e in rec.log if e[0] == "gemv"]
        assert gemvs == [names[id(m)] for m in layers]
        for n, (target, after) in enumerate(forks):  # forked right after `after`'s GEMV, joined before target's
            i = next(j for j, e in enumerate(rec.log) if e == ("gemv", after))
            i += 1 + sum(1 for t, a in forks[:n] if a == after)  # several forks after one GEMV: in order
            assert rec.log[i][0] == "fork"
            ev = rec.log[i][1]
            k = rec.log.index(("gemv", target))
            later = [j for j, e in enumerate(rec.log) if j > k and e[0] == "gemv"]
            if late and later:  # JOIN_LATE: before the projection after the target
                k = later[0]
            j = rec.log.index(("join", ev))
            assert j < k and all(e[0] == "join" for e in rec.log[j:k])  # joined right before that GEMV
        assert sum(e[0] == "fork" for e in rec.log) == sum(e[0] == "join" for e in rec.log) == len(forks)


def test_the_last_projection_never_links_to_the_first(monkeypatch):
    monkeypatch.setattr(int4_ahead, "DIST", {"qkv": (1, 1.0)})
    layers = model(1)
    ahead = int4_ahead.Ahead(launch=lambda t, f: None, streams=Recorder())
    for _ in range(2):
        for layer in layers:
            ahead.before(layer)
            ahead.after(layer)
    assert getattr(layers[-1], "_ahead_next", None) is None
    assert [getattr(m, "_ahead_next", None) for m in layers[:-1]] == layers[1:]


def test_parse_and_roles():
    assert int4_ahead._parse("o:1, qkv:2,gate_up:2@0.25") == {"o": (1, 1.0), "qkv": (2, 1.0), "gate_up": (2, 0.25)}
    assert int4_ahead._parse("") == {}
    assert [int4_ahead.role(m) for m in model(1)] == ["qkv", "o", "gate_up", "down"]
    assert int4_ahead.role(torch.nn.Linear(2, 2)) is None


def test_head_rows_follow_the_gemv3_split(monkeypatch):
    from kernels import w4a16

    layer = MergedColumnParallelLinear(1)
    layer.qweight = torch.empty(512, 28672, dtype=torch.int32)  # the 8B gate/up: K 4096 = 32 blocks of 16 words
    layer.in_k, layer.group_size = 4096, 128
    monkeypatch.setitem(w4a16.TUNED, (1, 28672, 4096), dict(KERNEL="gemv3", SPLIT_K=16))
    assert int4_ahead.head_rows(layer, 0.25) == (32, 8)  # 2 blocks per slice; its first of four 8-word tiles
    assert int4_ahead.head_rows(layer, 1.0) is None
    monkeypatch.setitem(w4a16.TUNED, (1, 28672, 4096), dict(KERNEL="gemv4"))
    assert int4_ahead.head_rows(layer, 0.25) is None


def test_head_lines_address_the_first_rows_of_each_slice():
    from kernels.w4a16_l2 import LINE, head_lines

    t = torch.empty(512, 28672, dtype=torch.int32)
    lines, chunk, stride = head_lines(t, 32, 8)
    row = 28672 * 4 // LINE
    assert (chunk, stride, lines) == (8 * row, 32 * row, 16 * 8 * row)
    got = {(v // chunk) * stride + v % chunk for v in range(lines)}  # the kernel's line mapping
    want = {r * row + c for s in range(16) for r in range(32 * s, 32 * s + 8) for c in range(row)}
    assert got == want


def test_loads_mode_reads_exactly_the_head_rows_under_the_interpreter():
    """kernels/w4a16_l2.py MODE 2 xors every int32 it loads and writes the result only when it is the magic value:
    data whose head rows xor to it (and whose whole does not) shows the kernel read those rows and no others."""
    from kernels import w4a16_l2

    if not torch.cuda.is_available():
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs the Triton interpreter or a GPU")
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 2**31 - 1, (64, 256), generator=g, dtype=torch.int32)  # rows of 1 KB: 8 lines each
    heads = torch.cat([t[16 * c:16 * c + 4] for c in range(4)])  # head=(16, 4): the first 4 of every 16 rows
    acc = 0
    for v in heads.flatten().tolist():
        acc ^= v
    t[0, 0] ^= acc ^ 0x5EED1E55  # now the head rows xor to the magic value
    w4a16_l2._SINK.clear()
    w4a16_l2.prefetch([t], mode=2)  # the whole tensor: another value, nothing written
    assert int(w4a16_l2._SINK[t.device]) == 0
    w4a16_l2.prefetch([t], mode=2, head=(16, 4))
    assert int(w4a16_l2._SINK[t.device]) == 0x5EED1E55
