"""An engine's load (KV blocks, queues, counters): declared once, with its Redis-hash and protobuf forms.

The engine fills one after every step; the engine server's Stats RPC, the registry publisher's Redis
hash and the router's registry view (services/common/registry.py) are conversions of it, never copies
written out field by field. A field's name is its protobuf field's name; `metadata["hash"]` names its
Redis hash field where that differs (the registry's Lua reads some of them by name: keep those names).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineLoad:
    total_blocks: int = field(default=0, metadata={"hash": "total"})
    """KV pool size in blocks."""
    free_blocks: int = field(default=0, metadata={"hash": "free"})
    """Blocks no request holds and no cached prefix occupies."""
    evictable_blocks: int = field(default=0, metadata={"hash": "evictable"})
    """Blocks no request holds that still cache a prefix (allocatable by eviction)."""
    waiting_blocks: int = 0
    """Blocks the prompts in the waiting queue will need once admitted."""
    running: int = 0
    """Sequences running."""
    waiting: int = 0
    """Sequences waiting."""
    block_size: int = 16
    """Tokens per block."""
    num_preemptions: int = 0
    """Preemptions since start."""
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache since start."""
    prefix_cache_hits: int = 0
    """Prompt tokens found in the prefix cache since start."""
    steps: int = 0
    """Engine steps run since start."""

    @property
    def kv_usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        used = self.total_blocks - self.free_blocks - self.evictable_blocks
        return used / self.total_blocks if self.total_blocks else 0.0

    @property
    def available_blocks(self) -> int:
        """Blocks a new request could get now: free, evictable, less what the waiting queue will take."""
        return self.free_blocks + self.evictable_blocks - self.waiting_blocks

    # --- Redis hash ------------------------------------------------------------------------------
    @staticmethod
    def hash_name(attr: str) -> str:
        """The Redis hash field that holds attribute `attr`."""
        return _FIELDS[attr].metadata.get("hash", attr)

    def to_hash(self) -> dict[str, str]:
        return {self.hash_name(f.name): str(getattr(self, f.name)) for f in _FIELDS.values()}

    @classmethod
    def from_hash(cls, h: dict) -> EngineLoad:
        """Read a hash as Redis returns it (strings); a missing field takes its default."""
        kw = {}
        for f in _FIELDS.values():
            v = h.get(cls.hash_name(f.name))
            if v not in (None, ""):
                kw[f.name] = int(v)
        return cls(**kw)

    # --- protobuf --------------------------------------------------------------------------------
    def fill_pb(self, msg):
        """Set the fields of `msg` that share a name with this record (kv_usage included); returns `msg`.
        Used for engine.proto's EngineStatsResponse and, through EngineRecord, router.proto's EngineState."""
        names = msg.DESCRIPTOR.fields_by_name
        for name in (*_FIELDS, "kv_usage"):
            if name in names:
                setattr(msg, name, getattr(self, name))
        return msg

    @classmethod
    def from_pb(cls, msg) -> EngineLoad:
        """Read the fields of `msg` that share a name with this record (kv_usage is derived, not read)."""
        names = msg.DESCRIPTOR.fields_by_name
        return cls(**{name: getattr(msg, name) for name in _FIELDS if name in names})


_FIELDS = {f.name: f for f in dataclasses.fields(EngineLoad)}
