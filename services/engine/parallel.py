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


def _init_groups(rank: int, world_size: int, device: torch.device, store) -> tuple[TPGroup, object]:
    if device.type == "cuda":
        for k, v in NCCL_SAFE_ENV.items():  # read by NCCL when the communicator is created, just below
            os.environ.setdefault(k, v)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size, device_id=device)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
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


# --- rank 0 -------------------------------------------------------------------------------------------
class TensorParallelRunner:
    """Rank 0's ModelRunner for a tensor-parallel group: same interface, mirrored on every worker."""

    MIRRORED = ("allocate_kv_cache", "warmup", "capture_decode_graphs", "copy_blocks")

    def __init__(self, model_dir, hf_config: dict, dtype: torch.dtype, device: torch.device, attention_backend: str,
                 block_size: int, load_format: str, tensor_parallel_size: int, seed: int | None):
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
        self._procs: list[subprocess.Popen] = []
        store = dist.TCPStore("127.0.0.1", 0, tp, is_master=True, wait_for_workers=False, timeout=_STARTUP_TIMEOUT)
        spec = {"model_dir": str(model_dir), "hf_config": hf_config, "dtype": str(dtype).removeprefix("torch."),
                "device": str(device), "attention_backend": attention_backend, "block_size": block_size,
                "load_format": load_format, "seed": seed, "world_size": tp, "parent_pid": os.getpid(),
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
            self.group, self._control = _init_groups(0, tp, device, store)
            self.local = ModelRunner(model_dir, hf_config, dtype, device, attention_backend, block_size,
                                     load_format, tp=self.group)
            self._guard(lambda: dist.barrier(group=self._control))  # every worker has loaded its shard
        except BaseException:
            self.shutdown()
            raise
        log.info("tensor parallel: %d ranks (%s), worker pids %s", tp, dist.get_backend(),
                 [p.pid for p in self._procs])

    def __getattr__(self, name):  # cfg, model, kv_caches, prepare, weight_bytes, ...: the local shard's
        if name == "local":
            raise AttributeError(name)
        attr = getattr(self.local, name)
        if name in self.MIRRORED:
            def mirrored(*args):
                self._send({"call": name, "args": args})
                return attr(*args)

            return mirrored
        return attr

    def execute(self, inputs) -> torch.Tensor:
        tensors: list[torch.Tensor] = []
        header = {"call": "execute", "inputs": _split(inputs, tensors)}
        self._send(header)
        for t in tensors:
            dist.broadcast(t, src=0)
        return self.local.execute(inputs)

    def _send(self, header: dict) -> None:
        self._guard(lambda: dist.broadcast_object_list([header], src=0, group=self._control))

    def _guard(self, fn):
        try:
            return fn()
        except RuntimeError as e:
            dead = [(r + 1, p.poll()) for r, p in enumerate(self._procs) if p.poll() is not None]
            if dead:
                raise RuntimeError(f"tensor-parallel worker(s) exited: (rank, exit code) {dead}; "
                                   f"their logs are above") from e
            raise

    def shutdown(self) -> None:
        """Tell the workers to exit and wait for them; then (and also if this runner is dropped without
        shutdown) terminate what is left and leave the process group."""
        control = getattr(self, "_control", None)
        if control is not None and dist.is_initialized() and all(p.poll() is None for p in self._procs):
            try:
                dist.broadcast_object_list([{"call": "shutdown"}], src=0, group=control)
                for p in self._procs:
                    p.wait(10)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        self._finalizer()


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
    group, control = _init_groups(rank, world, device, store)
    runner = ModelRunner(Path(spec["model_dir"]), spec["hf_config"], getattr(torch, spec["dtype"]), device,
                         spec["attention_backend"], spec["block_size"], spec["load_format"], tp=group)
    dist.barrier(group=control)
    log.info("rank %d of %d ready on %s", rank, world, device)
    while True:
        msg = [None]
        try:
            dist.broadcast_object_list(msg, src=0, group=control)
        except RuntimeError:
            time.sleep(1.0)  # rank 0's sockets close just before its children are re-parented
            if os.getppid() != spec["parent_pid"]:
                os._exit(1)  # rank 0 is gone: nothing to report to
            raise
        msg = msg[0]
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
            runner.execute(_join(StepInputs, fields, tensors))
        else:
            getattr(runner, call)(*msg["args"])
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # Run the imported module's copy, not __main__'s: pickled headers name services.engine.parallel's classes.
    from services.engine.parallel import worker_main as _worker_main

    sys.exit(_worker_main(json.loads(sys.argv[1])))
