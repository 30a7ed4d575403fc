"""bench/serving_stats.py: the pooled TTFT p50 difference and its paired bootstrap interval."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from serving_stats import bootstrap_p50_diff, p50_diff, paired_runs  # noqa: E402


def _runs(shift, n_runs=6, n=40, seed=1):
    """Per run: in-process TTFTs with a wide spread (step phase, prompt length), the stack's the same plus
    `shift` and a little noise of its own."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_runs):
        p = rng.uniform(8, 16, n)
        s = p + shift + rng.normal(0, 0.1, n)
        out.append(({f"r{i}": (x,) for i, x in enumerate(s)}, {f"r{i}": (x,) for i, x in enumerate(p)}))
    return out


def test_pairs_only_requests_both_paths_answered():
    runs = paired_runs([({"r0": (1.0,), "r1": (2.0,)}, {"r1": (5.0,), "r2": (7.0,)}), ({"a": 3.0}, {})])
    assert len(runs) == 1
    assert runs[0][0].tolist() == [2.0] and runs[0][1].tolist() == [5.0]


def test_pooled_difference_and_interval_find_the_shift():
    runs = paired_runs(_runs(1.5))
    b = bootstrap_p50_diff(runs, reps=2000)
    assert b["diff"] == p50_diff(runs)
    assert b["lo"] < 1.5 < b["hi"]
    assert b["hi"] - b["lo"] < 0.6  # the pairing keeps the shared spread (uniform 8-16 ms) out of it
    assert b["requests"] == 240 and b["runs"] == 6


def test_unpaired_noise_widens_the_interval():
    rng = np.random.default_rng(3)
    paired = paired_runs(_runs(1.5))
    shuffled = [(s, rng.permutation(p)) for s, p in paired]  # the same values, the pairing broken
    a, b = bootstrap_p50_diff(paired, reps=2000), bootstrap_p50_diff(shuffled, reps=2000)
    assert (b["hi"] - b["lo"]) > 1.5 * (a["hi"] - a["lo"])
