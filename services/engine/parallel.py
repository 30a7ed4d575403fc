"""Tensor parallelism: the engine process is rank 0 and drives one worker process per other rank.

Rank 0 keeps everything that is not the forward pass (scheduler, block manager, sampler, gRPC server,
Redis publisher). Its `TensorParallelRunner` stands in for the `ModelRunner`: every call that touches
the weights or the KV cache (allocate, warm up, capture graphs, copy blocks, execute) is first
broadcast to the workers, then run locally, so all ranks run the same collectives in the same order.
Each rank holds a shard of the weights and of the KV cache (its KV heads); the model all-reduces
partial outputs and gathers the vocabulary-sharded logits (services/engine/model/layers/linear.py,
layers/embedding.py). Design and commands: docs/tensor-parallel.md.

Two process groups: the default one (NCCL on CUDA, gloo on CPU) carries the model's collectives and
the step's tensors; a gloo group with a long timeout carries the small control messages, so an idle
engine's workers can wait for the next step indefinitely, and a dead peer is noticed at once (a
closed socket) rather than after a NCCL timeout.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from services.engine.attention.metadata import AttentionMetadata

log = logging.getLogger("folio.engine.tp")

# NVLink multicast (NVLS) stays off: on shared multi-GPU hosts a program using it can take the GPUs
# out of service. Defaults only: a variable already set in the environment wins.
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
_CONTROL_TIMEOUT = datetime.timedelta(days=365)  # a worker waits this long for rank 0's next step
_STARTUP_TIMEOUT = datetime.timedelta(minutes=5)  # for every rank to join the group
_DONE_KEY = "folio/tp/done/{rank}"  # in the rendezvous store: the last step a worker finished


class TensorParallelError(RuntimeError):
    """The group is broken: a worker exited, or a step's collectives did not complete in time. Nothing
    more can run on it, so the engine ends (the service exits and the router resumes its streams
    elsewhere); the message names the step and the ranks behind."""

    fatal = True


def _device_timeout(timeout_s: float, device: torch.device) -> datetime.timedelta:
    # gloo raises at the timeout, which rank 0 turns into a TensorParallelError. NCCL's own watchdog would
    # abort the process with a message that names neither rank nor step, so on CUDA it is only the
    # backstop, later than rank 0's _StepWatch (1.5 x timeout + 5 s).
    return datetime.timedelta(seconds=timeout_s if device.type != "cuda" else 2 * timeout_s + 30)


class TPGroup:
    """This process's rank in the tensor-parallel group and the two collectives the model needs."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, n] on every rank -> [rows, world_size * n], rank r's columns at r*n (every rank gets it)."""
        rows, n = x.shape
        out = torch.empty((self.world_size * rows, n), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x.contiguous())
        return out.view(self.world_size, rows, n).permute(1, 0, 2).reshape(rows, self.world_size * n)


# all_gather_single is torch >= 2.12's name for all_gather_into_tensor (deprecated there).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r uses the r-th GPU counting from the configured one; every rank of a CPU group uses the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def _init_groups(rank: int, world_size: int, device: torch.device, store,
                 timeout_s: float) -> tuple[TPGroup, object]:
    timeout = _device_timeout(timeout_s, device)
    if device.type == "cuda":
        for k, v in NCCL_SAFE_ENV.items():  # read by NCCL when the communicator is created, just below
            os.environ.setdefault(k, v)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size, device_id=device,
                                timeout=timeout)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)
    return TPGroup(rank, world_size), control


# --- the step's inputs on the wire ------------------------------------------------------------------
# A StepInputs (and its AttentionMetadata) becomes a picklable header, with each tensor replaced by its
# (index, shape, dtype), plus the list of tensors, which travel by broadcast on the device group.
@dataclasses.dataclass(frozen=True)
class _TensorSpec:
    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _split(obj, tensors: list[torch.Tensor]) -> dict:
    fields = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            fields[f.name] = _TensorSpec(len(tensors), tuple(v.shape), v.dtype)
            tensors.append(v)
        elif isinstance(v, AttentionMetadata):
            fields[f.name] = _split(v, tensors)
        else:
            fields[f.name] = v
    return fields


def _join(cls, fields: dict, tensors: list[torch.Tensor]):
    kw = {}
    for name, v in fields.items():
        if isinstance(v, _TensorSpec):
            kw[name] = tensors[v.index]
        elif isinstance(v, dict):
            kw[name] = _join(AttentionMetadata, v, tensors)
        else:
            kw[name] = v
    return cls(**kw)


def _tensor_specs(fields: dict) -> list[_TensorSpec]:
    specs = []
    for v in fields.values():
        if isinstance(v, _TensorSpec):
            specs.append(v)
        elif isinstance(v, dict):
            specs += _tensor_specs(v)
    return sorted(specs, key=lambda s: s.index)


# A header travels on the control group as its pickled size, then its bytes. Rank 0 bounds its wait for
# every worker to take it (a stuck worker must not hang rank 0 there: the control group's own timeout is
# a year, since an idle engine's workers wait on it for the next step).
def _send_header(header: dict, group, timeout: datetime.timedelta) -> None:
    data = torch.frombuffer(bytearray(pickle.dumps(header)), dtype=torch.uint8)
    for t in (torch.tensor([data.numel()], dtype=torch.int64), data):
        work = dist.broadcast(t, src=0, group=group, async_op=True)
        if work.wait(timeout=timeout) is False:
            raise TimeoutError(f"a worker did not take the step's header within {timeout.total_seconds():g}s")


def _receive_header(group) -> dict:
    size = torch.empty(1, dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    data = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, src=0, group=group)
    return pickle.loads(data.numpy().tobytes())


# --- rank 0 -------------------------------------------------------------------------------------------
class TensorParallelRunner:
    """Rank 0's ModelRunner for a tensor-parallel group: same interface, mirrored on every worker."""

    MIRRORED = ("allocate_kv_cache", "warmup", "capture_decode_graphs", "capture_mixed_graphs", "copy_blocks")

    def __init__(self, model_dir, hf_config: dict, dtype: torch.dtype, device: torch.device, attention_backend: str,
                 block_size: int, load_format: str, tensor_parallel_size: int, seed: int | None,
                 collective_timeout_s: float = 120.0, kv_cache_dtype: str = "auto", quantization: str | None = None):
        from services.engine.model.registry import model_config
        from services.engine.model.sharding import check_tensor_parallel
        from services.engine.model_runner import ModelRunner

        tp = tensor_parallel_size
        check_tensor_parallel(model_config(hf_config, f"{model_dir}/config.json"), tp)
        if device.type == "cuda" and torch.cuda.device_count() < (device.index or 0) + tp:
            raise ValueError(f"tensor_parallel_size {tp} needs {tp} GPUs from {device}; "
                             f"{torch.cuda.device_count()} visible")
        if dist.is_initialized():
            raise ValueError("tensor_parallel_size > 1: this process already belongs to a torch.distributed "
                             "group (one tensor-parallel engine per process; shut the other down first)")
        device = rank_device(device, 0)  # "cuda" -> "cuda:0": NCCL binds the group to an indexed device
        self.world_size = tp
        self.collective_timeout_s = collective_timeout_s
        self._procs: list[subprocess.Popen] = []
        self._step = 0
        self._broken = False
        store = self._store = dist.TCPStore("127.0.0.1", 0, tp, is_master=True, wait_for_workers=False, timeout=_STARTUP_TIMEOUT)
        spec = {"model_dir": str(model_dir), "hf_config": hf_config, "dtype": str(dtype).removeprefix("torch."),
                "device": str(device), "attention_backend": attention_backend, "block_size": block_size,
                "load_format": load_format, "kv_cache_dtype": kv_cache_dtype, "quantization": quantization,
                "seed": seed, "world_size": tp,
                "parent_pid": os.getpid(), "collective_timeout_s": collective_timeout_s,
                "threads": max(1, torch.get_num_threads() // tp)}
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": pythonpath, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
               "WORLD_SIZE": str(tp)}
        if device.type == "cuda":
            env = {**NCCL_SAFE_ENV, **env}
        for rank in range(1, tp):
            self._procs.append(subprocess.Popen(
                [sys.executable, "-m", "services.engine.parallel", json.dumps({**spec, "rank": rank})],
                env={**env, "RANK": str(rank)}))
        self._finalizer = weakref.finalize(self, _terminate, list(self._procs))
        try:
            self.group, self._control = _init_groups(0, tp, device, store, collective_timeout_s)
            self.local = ModelRunner(model_dir, hf_config, dtype, device, attention_backend, block_size,
                                     load_format, tp=self.group, kv_cache_dtype=kv_cache_dtype,
                                     quantization=quantization)
            self._guard(lambda: dist.barrier(group=self._control))  # every worker has loaded its shard
        except BaseException:
            self.shutdown()
            raise
        self._watch = _StepWatch(1.5 * collective_timeout_s + 5, self._diagnose)
        log.info("tensor parallel: %d ranks (%s), worker pids %s", tp, dist.get_backend(),
                 [p.pid for p in self._procs])

    def __getattr__(self, name):  # cfg, model, kv_caches, prepare, weight_bytes, ...: the local shard's
        if name == "local":
            raise AttributeError(name)
        attr = getattr(self.local, name)
        if name in self.MIRRORED:
            def mirrored(*args):
                self._send({"call": name, "args": args})
                return self._guard(lambda: attr(*args))

            return mirrored
        return attr

    def execute(self, inputs) -> torch.Tensor:
        self._step += 1
        step = self._step
        tensors: list[torch.Tensor] = []
        header = {"call": "execute", "inputs": _split(inputs, tensors)}

        def run():
            for t in tensors:
                dist.broadcast(t, src=0)
            return self.local.execute(inputs)

        self._watch.begin(step)
        try:
            self._send(header, step)
            out = self._guard(run, step)
        except BaseException:
            self._watch.end(None)  # it raised: the caller knows; the backstop has nothing left to do
            raise
        self._watch.end(_recorded_event() if out.is_cuda else None)
        return out

    def _send(self, header: dict, step: int | None = None) -> None:
        timeout = datetime.timedelta(seconds=self.collective_timeout_s)
        self._guard(lambda: _send_header(header, self._control, timeout), step)

    def _guard(self, fn, step: int | None = None):
        """Run one part of a mirrored call; any failure breaks the group (the workers are left inside a
        collective rank 0 will never join), so it becomes a TensorParallelError saying why."""
        try:
            return fn()
        except Exception as e:
            self._broken = True
            if self._exited():
                raise TensorParallelError(f"tensor-parallel worker(s) exited: {self._exited()}; "
                                          f"their logs are above") from e
            what = f"step {step}" if step is not None else "a mirrored call"
            raise TensorParallelError(f"tensor-parallel {what} did not complete ({type(e).__name__}: "
                                      f"{str(e)[:200]}; collective timeout {self.collective_timeout_s:g}s); "
                                      f"{self._diagnose(step)}") from e

    def _exited(self) -> str:
        return ", ".join(f"rank {r} (pid {p.pid}) exit code {p.poll()}"
                         for r, p in enumerate(self._procs, start=1) if p.poll() is not None)

    def _diagnose(self, step: int | None) -> str:
        """Which workers are behind: each one's last finished step (from the store) and process state."""
        behind = []
        for r, p in enumerate(self._procs, start=1):
            if p.poll() is not None:
                behind.append(f"rank {r} (pid {p.pid}) exited with code {p.poll()}")
                continue
            try:
                done = int(self._store.get(_DONE_KEY.format(rank=r)))
            except Exception:  # noqa: BLE001 - a diagnosis must not raise
                done = None
            if step is None or done is None or done < step:
                state = _process_state(p.pid)
                behind.append(f"rank {r} (pid {p.pid}{', ' + state if state else ''}) last finished step "
                              f"{done if done is not None else '?'}")
        if not behind:
            return "every worker finished it: rank 0's own part did not complete"
        return "behind: " + "; ".join(behind) + ". The group is unusable; the engine ends"

    def shutdown(self) -> None:
        """Tell the workers to exit and wait for them; then (and also if this runner is dropped without
        shutdown) terminate what is left and leave the process group."""
        control = getattr(self, "_control", None)
        if self._broken:  # workers wait inside a collective that will never complete: no polite exit
            for p in self._procs:
                p.kill()
        elif control is not None and dist.is_initialized() and all(p.poll() is None for p in self._procs):
            try:
                _send_header({"call": "shutdown"}, control, datetime.timedelta(seconds=self.collective_timeout_s))
                for p in self._procs:
                    p.wait(10)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        self._finalizer()


class _StepWatch:
    """Rank 0's backstop for a hang no exception reaches (on CUDA a stuck collective shows only when the
    host waits for the device): a step not complete, on the device too, `after_s` after it began ends
    the process with the diagnosis. On CPU gloo's own timeout raises first (TensorParallelError)."""

    def __init__(self, after_s: float, diagnose):
        self.after_s = after_s
        self._diagnose = diagnose
        self._lock = threading.Lock()
        self._step: int | None = None
        self._t0 = 0.0
        self._event = None
        threading.Thread(target=self._run, name="tp-step-watch", daemon=True).start()

    def begin(self, step: int) -> None:
        with self._lock:
            self._step, self._t0, self._event = step, time.monotonic(), None

    def end(self, event) -> None:
        """The host part returned; `event` (CUDA) completes with the device part, None: nothing pending."""
        with self._lock:
            if event is None:
                self._step = None
            else:
                self._event = event

    def _run(self) -> None:
        while True:
            time.sleep(min(1.0, self.after_s / 4))
            with self._lock:
                step, t0, event = self._step, self._t0, self._event
            if step is None or (event is not None and event.query()):
                continue
            if time.monotonic() - t0 > self.after_s:
                log.critical("tensor-parallel step %d has not completed after %.0fs; %s", step, self.after_s,
                             self._diagnose(step))
                logging.shutdown()
                os._exit(1)


def _recorded_event() -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record()
    return event


def _process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            code = f.read().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return ""
    return {"T": "stopped", "t": "stopped by a tracer", "Z": "exited", "D": "in uninterruptible sleep"}.get(code, "")


def _terminate(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if dist.is_initialized():
        dist.destroy_process_group()


# --- ranks 1.. ----------------------------------------------------------------------------------------
def _exit_with_parent(parent_pid: int) -> None:
    # A worker must never outlive rank 0, also when rank 0 is SIGKILLed while this one waits inside a
    # NCCL collective (which a closed socket does not interrupt). Re-parenting shows the death.
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(0.5)


class _Progress:
    """A worker's last finished step, published to the rendezvous store off the step's path (rank 0
    reads it to say which rank is behind when a step hangs)."""

    def __init__(self, store, rank: int):
        self._store, self._key = store, _DONE_KEY.format(rank=rank)
        self._step = 0
        self._pending: list = []
        self._wake = threading.Event()
        store.set(self._key, "0")
        threading.Thread(target=self._run, name="tp-progress", daemon=True).start()

    def finished(self, out: torch.Tensor) -> None:
        self._step += 1
        if not out.is_cuda:  # finished now; a store write (~0.1 ms) is small beside a CPU step
            self._store.set(self._key, str(self._step))
            return
        self._pending.append((self._step, _recorded_event()))
        self._wake.set()

    def _run(self) -> None:
        sent = 0
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._pending:
                step, event = self._pending[0]
                if event is not None:
                    event.synchronize()  # finished on the device, not only enqueued
                self._pending.pop(0)
                if step > sent and not self._pending:
                    try:
                        self._store.set(self._key, str(step))
                    except Exception:  # noqa: BLE001 - rank 0 is gone; the parent watch ends this process
                        return
                    sent = step


def worker_main(spec: dict) -> int:
    from services.engine.model_runner import ModelRunner, StepInputs

    rank, world = spec["rank"], spec["world_size"]
    threading.Thread(target=_exit_with_parent, args=(spec["parent_pid"],), daemon=True).start()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{rank} %(name)s %(levelname)s %(message)s")
    device = rank_device(torch.device(spec["device"]), rank)
    if device.type == "cpu":
        torch.set_num_threads(spec["threads"])
    if spec["seed"] is not None:
        torch.manual_seed(spec["seed"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=_STARTUP_TIMEOUT)
    group, control = _init_groups(rank, world, device, store, spec["collective_timeout_s"])
    progress = _Progress(store, rank)
    runner = ModelRunner(Path(spec["model_dir"]), spec["hf_config"], getattr(torch, spec["dtype"]), device,
                         spec["attention_backend"], spec["block_size"], spec["load_format"], tp=group,
                         kv_cache_dtype=spec["kv_cache_dtype"], quantization=spec.get("quantization"))
    dist.barrier(group=control)
    log.info("rank %d of %d ready on %s", rank, world, device)
    while True:
        try:
            msg = _receive_header(control)
        except RuntimeError:
            time.sleep(1.0)  # rank 0's sockets close just before its children are re-parented
            if os.getppid() != spec["parent_pid"]:
                os._exit(1)  # rank 0 is gone: nothing to report to
            raise
        call = msg["call"]
        if call == "shutdown":
            break
        if call == "execute":
            fields = msg["inputs"]
            tensors = []
            for s in _tensor_specs(fields):
                t = torch.empty(s.shape, dtype=s.dtype, device=device)
                dist.broadcast(t, src=0)
                tensors.append(t)
            out = runner.execute(_join(StepInputs, fields, tensors))
            progress.finished(out)
        else:
            getattr(runner, call)(*msg["args"])
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # Run the imported module's copy, not __main__'s: pickled headers name services.engine.parallel's classes.
    from services.engine.parallel import worker_main as _worker_main

    sys.exit(_worker_main(json.loads(sys.argv[1])))
