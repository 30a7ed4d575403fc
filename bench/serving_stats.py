"""The serving bench's statistic for the hops' TTFT target: the difference of TTFT p50 (stack minus in-process)
at one rate, over every request of every run pooled, with a paired, run-stratified bootstrap interval.

Why pooled and paired (docs/router.md, "Benching the hops"): a run's own p50 over a dozen requests swings by
+-1 ms with the step phase each request meets, so a mean of per-run differences needs many runs. Every
request is replayed on both paths (the same prompt, output length and arrival offset), so a bootstrap that
resamples request indices, the same indices on both paths, keeps what the two paths share (the prompt's
prefill, the load it arrives into) out of the interval; resampling within each run keeps the runs' own
schedules as they were. The statistic itself is unchanged: p50 of the client's TTFT on the stack minus p50 of
the same requests' TTFT on the in-process engine.
"""

from __future__ import annotations

import numpy as np


def paired_runs(runs: list[tuple[dict, dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per run, the TTFTs (ms) of the requests both paths answered, in one order: (stack, in-process).
    `runs`: per run, the two paths' {request id: ttft_ms or (ttft_ms, ...)}."""
    out = []
    for s, p in runs:
        rids = [r for r in s if r in p]
        if rids:
            first = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731
            out.append((np.array([first(s[r]) for r in rids], float), np.array([first(p[r]) for r in rids], float)))
    return out


def p50_diff(runs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """p50 over all runs' requests on the stack minus the same on the in-process path."""
    return float(np.median(np.concatenate([s for s, _ in runs])) - np.median(np.concatenate([p for _, p in runs])))


def bootstrap_p50_diff(runs: list[tuple[np.ndarray, np.ndarray]], reps: int = 4000, seed: int = 0,
                       level: float = 0.95) -> dict:
    """The pooled p50 difference, its bootstrap interval (percentile method) and standard error. Each replicate
    draws, within every run, as many request indices as the run has, with replacement, and takes the same
    requests on both paths."""
    rng = np.random.default_rng(seed)
    s_parts, p_parts = [], []
    for s, p in runs:
        idx = rng.integers(0, len(s), (reps, len(s)))
        s_parts.append(s[idx])
        p_parts.append(p[idx])
    boot = np.median(np.concatenate(s_parts, axis=1), axis=1) - np.median(np.concatenate(p_parts, axis=1), axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
    return {"diff": p50_diff(runs), "lo": float(lo), "hi": float(hi), "se": float(np.std(boot, ddof=1)),
            "requests": int(sum(len(s) for s, _ in runs)), "runs": len(runs)}
