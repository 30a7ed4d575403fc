"""quantization/int4_ahead.py: the learnt call order, where prefetches fork and where they join (CPU, fake streams)."""

import pytest
import torch

from services.engine.model.quantization import int4_ahead


class QKVParallelLinear(torch.nn.Module):
    def __init__(self, mb):
        super().__init__()
        self.qweight = torch.empty(mb << 18, dtype=torch.int32)  # mb MiB


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
        out += [QKVParallelLinear(12), RowParallelLinear(8), MergedColumnParallelLinear(56), RowParallelLinear(28)]
    return out


def forward(ahead, rec, layers, names):
    for layer in layers:
        ahead.before(layer)
        rec.log.append(("gemv", names[id(layer)]))
        ahead.after(layer)


@pytest.mark.parametrize("dist,forks", [
    ({"RowParallelLinear": 1}, [("o0", "qkv0"), ("o1", "qkv1")]),
    ({"RowParallelLinear": 1, "QKVParallelLinear": 2}, [("o0", "qkv0"), ("qkv1", "gate_up0"), ("o1", "qkv1")]),
    ({"QKVParallelLinear": 1}, [("qkv1", "down0")]),
])
def test_forks_after_the_learnt_predecessor_and_joins_before_the_target(monkeypatch, dist, forks):
    monkeypatch.setattr(int4_ahead, "DIST", dist)
    layers = model()
    names = {id(m): f"{k}{i // 4}" for i, (m, k) in enumerate(zip(layers, ["qkv", "o", "gate_up", "down"] * 2))}
    rec, fetched = Recorder(), []
    ahead = int4_ahead.Ahead(launch=lambda t: fetched.append(names[id(t)]), streams=rec)
    forward(ahead, rec, layers, names)  # learns the order: nothing forked yet
    assert fetched == [] and all(e[0] == "gemv" for e in rec.log)
    for _ in range(2):  # the next forwards (the second as a graph capture would see it)
        rec.log, fetched[:] = [], []
        forward(ahead, rec, layers, names)
        assert fetched == [t for t, _ in forks]
        gemvs = [e[1] for e in rec.log if e[0] == "gemv"]
        assert gemvs == [names[id(m)] for m in layers]
        for target, after in forks:  # forked right after `after`'s GEMV, joined right before target's
            i = next(j for j, e in enumerate(rec.log) if e == ("gemv", after))
            assert rec.log[i + 1][0] == "fork"
            ev = rec.log[i + 1][1]
            k = next(j for j, e in enumerate(rec.log) if e == ("gemv", target))
            assert rec.log[k - 1] == ("join", ev)
        assert sum(e[0] == "fork" for e in rec.log) == sum(e[0] == "join" for e in rec.log) == len(forks)


def test_the_last_projection_never_links_to_the_first(monkeypatch):
    monkeypatch.setattr(int4_ahead, "DIST", {"QKVParallelLinear": 1})
    layers = model(1)
    ahead = int4_ahead.Ahead(launch=lambda t: None, streams=Recorder())
    for _ in range(2):
        for layer in layers:
            ahead.before(layer)
            ahead.after(layer)
    assert getattr(layers[-1], "_ahead_next", None) is None
    assert [getattr(m, "_ahead_next", None) for m in layers[:-1]] == layers[1:]


def test_parse():
    assert int4_ahead._parse("RowParallelLinear:1, QKVParallelLinear:2") == {"RowParallelLinear": 1,
                                                                              "QKVParallelLinear": 2}
    assert int4_ahead._parse("") == {}
