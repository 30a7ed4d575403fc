"""Per-step trace of an engine run, for the benchmarks: where the GPU's time goes by kind of step.

`StepTrace(engine)` wraps the engine's launch of each step (prepare, forward, sample) with CUDA events and
host timestamps; nothing is synchronised while the run goes on. `summary()` (after a synchronize) groups the
steps by kind -- plain decode, a mixed step a graph can hold (<= the largest mixed graph bucket), a larger
mixed step -- and gives, per kind, the GPU span of a launch (its first event to its last: the device's work
for the step, plus any time the device waited for the host to issue it), the device's idle gap before it
(the previous launch's last event to this one's first: time nothing was queued), and the host's launch time.
On CPU the events are absent and only host times are reported.
"""

from __future__ import annotations

import gc
import time

import torch


def _triton_runtime_knobs():
    try:
        import triton

        knobs = triton.knobs.runtime
        return knobs if hasattr(knobs, "jit_post_compile_hook") else None
    except (ImportError, AttributeError):
        return None


class StepTrace:
    def __init__(self, engine):
        self.engine = engine
        self.cuda = engine.device.type == "cuda"
        self.t_start, self.ev_start = time.perf_counter(), None
        """When the trace began (just before the timed run): the time to the first launch is host work only."""
        if self.cuda:
            torch.cuda.synchronize()
            self.ev_start = self._event()
        self.rows: list[dict] = []
        self.mem0 = self._mem()
        self.compiles: list[tuple[int, str]] = []
        """(step index, kernel) of each Triton compile during the run: a compile in a timed run is a warm-up miss"""
        self._launch = engine._launch
        engine._launch = self._traced_launch
        self._step = engine.step
        engine.step = self._traced_step
        self.phases: dict[str, dict[str, float]] = {}
        """kind of the step launched -> host seconds per engine phase (step_timing's names) summed over the
        engine.step() calls that launched it (a call also resolves the step before: its wait and update)."""
        self.gc_ms: dict[int, list[float]] = {}
        """generation -> milliseconds of each cyclic-collector pass during the run (a pause of the host loop)."""
        self._gc_t0 = 0.0
        gc.callbacks.append(self._on_gc)
        self._knobs = _triton_runtime_knobs()
        if self._knobs is not None:
            self._old_hook = self._knobs.jit_post_compile_hook
            self._knobs.jit_post_compile_hook = self._on_compile

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_ms.setdefault(info["generation"], []).append(1e3 * (time.perf_counter() - self._gc_t0))

    def detach(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        self.engine._launch = self._launch
        self.engine.step = self._step
        if self._knobs is not None:
            self._knobs.jit_post_compile_hook = self._old_hook

    def _on_compile(self, *args, **kwargs):
        name = str(kwargs.get("repr") or kwargs.get("fn") or args[:1])
        self.compiles.append((len(self.rows), name.split("(")[0][:120]))
        return None

    MEM_KEYS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")

    def _mem(self) -> tuple[int, ...]:
        """The caching allocator's counters: a device allocation, free or retry inside a step can block the host."""
        if not self.cuda:
            return ()
        stats = torch.cuda.memory_stats()
        return tuple(int(stats.get(k, 0)) for k in self.MEM_KEYS)

    def _event(self):
        if not self.cuda:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _traced_step(self):
        timing = self.engine.step_timing
        before = dict(timing) if timing is not None else None
        n = len(self.rows)
        result = self._step()
        if before is not None and len(self.rows) > n:
            acc = self.phases.setdefault(self.rows[-1]["kind"], {})
            for k, v in self.engine.step_timing.items():
                if k != "steps":
                    acc[k] = acc.get(k, 0.0) + v - before.get(k, 0.0)
        return result

    LAUNCH_PHASES = ("prepare", "forward", "sample")

    def _traced_launch(self, out, prev):
        timing = self.engine.step_timing
        before = [timing.get(k, 0.0) for k in self.LAUNCH_PHASES] if timing is not None else None
        t0, ev0 = time.perf_counter(), self._event()
        result = self._launch(out, prev)
        ev1, t1 = self._event(), time.perf_counter()
        phases = ({k: 1e3 * (timing.get(k, 0.0) - b) for k, b in zip(self.LAUNCH_PHASES, before)}
                  if before is not None else {})
        self.rows.append({"kind": self._kind(out), "tokens": out.num_tokens, "seqs": len(out.seqs),
                          "host_ms": 1e3 * (t1 - t0), "ev": (ev0, ev1), "mem": self._mem(), "phases": phases,
                          "bucket": self._bucket(out), "t0": t0})
        return result

    def _bucket(self, out) -> tuple[str, int] | None:
        """The graph a step replays: ("decode", batch bucket) or ("mixed", token bucket); None: eager."""
        graphs = self.engine.runner.graphs
        if graphs is None:
            return None
        plain = out.plain_decode or out.num_tokens == len(out.seqs)
        table, n = (graphs.decode, len(out.seqs)) if plain else (graphs.mixed, out.num_tokens)
        fit = min((k for k in table if k >= n), default=None)
        return None if fit is None else ("decode" if plain else "mixed", fit)

    def _kind(self, out) -> str:
        if out.plain_decode or out.num_tokens == len(out.seqs):
            return "decode"
        graphs = self.engine.runner.graphs
        top = max(graphs.mixed) if graphs is not None and graphs.mixed else 0
        return "mixed<=graph" if out.num_tokens <= top else "mixed>graph"

    def summary(self) -> dict[str, dict]:
        """kind -> steps, mean tokens, and total / mean milliseconds of GPU span, idle gap and host launch."""
        kinds: dict[str, dict] = {}
        prev_end = None
        for r in self.rows:
            k = kinds.setdefault(r["kind"], {"steps": 0, "tokens": 0, "span_ms": 0.0, "gap_ms": 0.0, "host_ms": 0.0})
            k["steps"] += 1
            k["tokens"] += r["tokens"]
            k["host_ms"] += r["host_ms"]
            ev0, ev1 = r["ev"]
            if ev0 is not None:
                k["span_ms"] += ev0.elapsed_time(ev1)
                if prev_end is not None:
                    k["gap_ms"] += prev_end.elapsed_time(ev0)
                prev_end = ev1
        return kinds

    def print_table(self, label: str = "") -> dict[str, dict]:
        """Call right after the timed run returns (its end is taken as now)."""
        t_end, end_ev = time.perf_counter(), self._event()
        if self.cuda:
            torch.cuda.synchronize()
        kinds = self.summary()
        print(f"\nstep trace {label}: per kind, total ms (mean per step); span = device time of a launch, "
              "gap = device idle before it")
        print(f"{'kind':<14}{'steps':>6}{'tok/step':>9}{'span ms':>16}{'gap ms':>16}{'host launch ms':>18}")
        for name, k in kinds.items():
            n = k["steps"]
            print(f"{name:<14}{n:>6}{k['tokens'] / n:>9.0f}{k['span_ms']:>9.1f} ({k['span_ms'] / n:>5.2f})"
                  f"{k['gap_ms']:>9.1f} ({k['gap_ms'] / n:>5.2f}){k['host_ms']:>11.1f} ({k['host_ms'] / n:>5.2f})")
        if self.phases:
            print("host ms per step by phase, per kind of step launched (the call also resolves the step before):")
            for name, acc in self.phases.items():
                n = kinds[name]["steps"]
                print(f"  {name:<14}" + ", ".join(f"{k} {1e3 * v / n:.2f}" for k, v in acc.items()))
            kinds["phases_ms_per_step"] = {name: {k: 1e3 * v / kinds[name]["steps"] for k, v in acc.items()}
                                           for name, acc in self.phases.items()}
        slow = sorted(range(len(self.rows)), key=lambda i: -self.rows[i]["host_ms"])[:6]
        print("slowest launches (step: kind tokens host ms): " + ", ".join(
            f"{i}: {self.rows[i]['kind']} {self.rows[i]['tokens']} {self.rows[i]['host_ms']:.1f}" for i in sorted(slow)))
        kinds["wall"] = self._print_wall(end_ev, t_end)
        kinds["gc"] = {g: (len(v), sum(v), max(v)) for g, v in sorted(self.gc_ms.items())}
        print("cyclic collections during the run (generation: passes, total ms, longest ms): "
              + (", ".join(f"{g}: {n}, {t:.1f}, {m:.2f}" for g, (n, t, m) in kinds["gc"].items()) or "none"))
        self._print_launches()
        print(f"Triton compiles during the run: {len(self.compiles)}"
              + "".join(f"\n  step {i}: {name}" for i, name in self.compiles[:20]))
        kinds["compiles"] = len(self.compiles)
        if self.rows and self.cuda:
            prev, grew = self.mem0, []
            for i, r in enumerate(self.rows):
                if r["mem"] != prev:
                    grew.append(f"{i}: " + " ".join(f"{k[4:]}+{b - a}" for k, a, b in zip(self.MEM_KEYS, prev, r["mem"]) if b != a))
                prev = r["mem"]
            print(f"steps where the allocator went to the device: {len(grew)}" + "".join(f"\n  {g}" for g in grew[:12]))
            kinds["allocator_steps"] = len(grew)
        return kinds

    def _print_wall(self, end_ev, t_end: float) -> dict:
        """The run's wall time split: host time before the first launch, launches' device spans, idle gaps
        between launches, and the device time after the last launch's end until the run returned."""
        if not self.rows:
            return {}
        first, last = self.rows[0], self.rows[-1]
        wall = {"wall_ms": 1e3 * (t_end - self.t_start), "before_first_launch_ms": 1e3 * (first["t0"] - self.t_start)}
        if self.cuda:
            wall["span_ms"] = sum(r["ev"][0].elapsed_time(r["ev"][1]) for r in self.rows)
            wall["gap_ms"] = sum(a["ev"][1].elapsed_time(b["ev"][0]) for a, b in zip(self.rows, self.rows[1:]))
            wall["device_before_first_ms"] = self.ev_start.elapsed_time(first["ev"][0])
            wall["after_last_ms"] = last["ev"][1].elapsed_time(end_ev)
        print("run wall " + ", ".join(f"{k} {v:.1f}" for k, v in wall.items()))
        return wall

    def _print_launches(self, limit: int = 16) -> None:
        """The launches behind most of the lost time: the largest idle gaps before a launch and the slowest
        host launches, each with its host phases, its graph bucket (and whether this run replays it for the
        first time) and whether the allocator went to the device in it."""
        seen, first_use = set(), []
        for r in self.rows:
            first_use.append(r["bucket"] is not None and r["bucket"] not in seen)
            seen.add(r["bucket"])
        gaps = [0.0] + ([a["ev"][1].elapsed_time(b["ev"][0]) for a, b in zip(self.rows, self.rows[1:])]
                        if self.cuda else [0.0] * (len(self.rows) - 1))
        prev_mem = [self.mem0] + [r["mem"] for r in self.rows[:-1]]

        def line(i):
            r = self.rows[i]
            ph = "/".join(f"{r['phases'].get(k, 0.0):.2f}" for k in self.LAUNCH_PHASES)
            b = r["bucket"]
            alloc = "alloc" if r["mem"] != prev_mem[i] else ""
            return (f"  {i:>4} {r['kind']:<13}{r['tokens']:>6}{r['seqs']:>6}{gaps[i]:>8.2f}{r['host_ms']:>8.2f}  {ph:<18}"
                    f"{(b[0][0] + str(b[1])) if b else 'eager':>7}{' first' if first_use[i] else '':<7}{alloc}")

        pick = sorted(set(sorted(range(len(self.rows)), key=lambda i: -gaps[i])[:limit])
                      | set(sorted(range(len(self.rows)), key=lambda i: -self.rows[i]["host_ms"])[:limit // 2]))
        print(f"launches with the largest idle gaps before them or the slowest host launches "
              f"({sum(first_use)} first replays of a graph bucket in the run):")
        print(f"  {'step':>4} {'kind':<13}{'tok':>6}{'seqs':>6}{'gap ms':>8}{'host ms':>8}  prep/fwd/sample ms  bucket")
        for i in pick:
            print(line(i))
