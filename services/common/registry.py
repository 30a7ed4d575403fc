"""The Redis engine registry: engines publish their KV state, routers choose-and-reserve atomically.

Keys (all times are the Redis server's clock, so engine and router clocks never need to agree):

  folio:models                  set of model names ever registered
  folio:engines:{model}         set of engine ids serving the model (dead ids are pruned on read)
  folio:engine:{engine_id}      hash: `EngineRecord.to_hash()` (address, model, max_model_len and the
                                EngineLoad fields: total, free, evictable, waiting_blocks, running,
                                waiting, block_size, counters) and ts (ms); PEXPIRE = heartbeat TTL,
                                so an engine that stops publishing vanishes
  folio:reserved:{engine_id}    hash: request_id -> "blocks:ts_ms", blocks promised to requests that
                                routers sent but the engine has not yet reported

Choosing an engine (`CHOOSE_LUA`, one atomic script): among live engines of the model whose last
report is younger than `stale_ms` and not excluded by the caller, take the one with the largest
    free + evictable - waiting_blocks - reserved
(ties: fewer running + waiting requests, then the smaller engine id), and record a reservation of the request's blocks on it, in
the same step. Two router replicas therefore cannot both see the same headroom: the second sees the
first one's reservation. An engine's report carries the ids of the requests it admitted since its
previous report, and `PUBLISH_LUA` drops their reservations because the report now counts them.
Reservations older than `reservation_ttl_ms` are dropped (a request that never reached its engine).
The scripts touch keys they compute, so they need a single Redis (not Redis Cluster).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.common.engine_load import EngineLoad

PREFIX = "folio"
MODELS_KEY = f"{PREFIX}:models"


def engines_key(model: str) -> str:
    return f"{PREFIX}:engines:{model}"


def engine_key(engine_id: str) -> str:
    return f"{PREFIX}:engine:{engine_id}"


def reserved_key(engine_id: str) -> str:
    return f"{PREFIX}:reserved:{engine_id}"


_NOW = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: engine key, engines-of-model key, reserved key, models key
# ARGV: ttl_ms, engine_id, model, n (number of field/value items that follow), items..., admitted ids...
PUBLISH_LUA = _NOW + """
local n = tonumber(ARGV[4])
local items = {'ts', now}
for i = 5, 4 + n do items[#items + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(items))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[3])
for i = 5 + n, #ARGV do redis.call('HDEL', KEYS[3], ARGV[i]) end
return now
"""

# The hash fields CHOOSE_LUA reads, in the order it indexes them (st[1] .. st[7]).
_CHOOSE_FIELDS = ", ".join(f"'{n}'" for n in ("address", "ts", *map(EngineLoad.hash_name, (
    "free_blocks", "evictable_blocks", "waiting_blocks", "running", "waiting"))))

# KEYS: engines-of-model key
# ARGV: request_id, blocks, stale_ms, reservation_ttl_ms, excluded engine ids...
# Returns {engine_id, address, score} or false when no live engine remains.
CHOOSE_LUA = _NOW + """
local stale = tonumber(ARGV[3])
local rttl = tonumber(ARGV[4])
local excluded = {}
for i = 5, #ARGV do excluded[ARGV[i]] = true end
local best, best_addr, best_score, best_load = nil, nil, nil, nil
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local st = redis.call('HMGET', '""" + PREFIX + """:engine:' .. id, """ + _CHOOSE_FIELDS + """)
  if not st[1] then
    redis.call('SREM', KEYS[1], id)
  elseif not excluded[id] and now - tonumber(st[2]) <= stale then
    local rkey = '""" + PREFIX + """:reserved:' .. id
    local resv = 0
    local r = redis.call('HGETALL', rkey)
    for j = 1, #r, 2 do
      local blocks, ts = string.match(r[j + 1], '(%d+):(%d+)')
      if now - tonumber(ts) > rttl then
        redis.call('HDEL', rkey, r[j])
      else
        resv = resv + tonumber(blocks)
      end
    end
    local score = tonumber(st[3]) + tonumber(st[4]) - tonumber(st[5]) - resv
    local load = tonumber(st[6]) + tonumber(st[7])
    if best == nil or score > best_score or (score == best_score and (load < best_load
        or (load == best_load and id < best))) then
      best, best_addr, best_score, best_load = id, st[1], score, load
    end
  end
end
if best == nil then return false end
local rkey = '""" + PREFIX + """:reserved:' .. best
redis.call('HSET', rkey, ARGV[1], ARGV[2] .. ':' .. now)
redis.call('PEXPIRE', rkey, rttl)
return {best, best_addr, best_score}
"""


@dataclass(frozen=True)
class EngineRecord:
    """One engine as the registry holds it: who and where it is, and its last reported load."""

    engine_id: str
    address: str
    model: str
    max_model_len: int
    load: EngineLoad
    ts_ms: int = 0
    """When Redis received the report (set by PUBLISH_LUA on Redis's clock, not by the engine)."""
    reserved_blocks: int = 0
    """Blocks promised to requests routed since that report (the reserved key, not the hash)."""

    @property
    def available_blocks(self) -> int:
        return self.load.available_blocks - self.reserved_blocks

    def to_hash(self) -> dict[str, str]:
        """The engine's hash as it publishes it (PUBLISH_LUA adds `ts`)."""
        return {"address": self.address, "model": self.model, "max_model_len": str(self.max_model_len),
                **self.load.to_hash()}

    @classmethod
    def from_hash(cls, engine_id: str, h: dict, reserved: int = 0) -> EngineRecord:
        return cls(engine_id=engine_id, address=h.get("address", ""), model=h.get("model", ""),
                   max_model_len=int(h.get("max_model_len") or 0), load=EngineLoad.from_hash(h),
                   ts_ms=int(h.get("ts") or 0), reserved_blocks=reserved)

    def fill_pb(self, msg):
        """Fill router.proto's EngineState (`msg`); age_ms is left to the caller, who knows the time."""
        self.load.fill_pb(msg)
        msg.engine_id, msg.address, msg.model = self.engine_id, self.address, self.model
        msg.reserved_blocks = self.reserved_blocks
        return msg


async def read_engines(redis) -> tuple[list[EngineRecord], int]:
    """Every live engine of every model, with its outstanding reservations; and Redis's time (ms)."""
    sec, usec = await redis.time()
    now = sec * 1000 + usec // 1000
    models = await redis.smembers(MODELS_KEY)
    ids: list[str] = []
    for m in sorted(models):
        ids.extend(sorted(await redis.smembers(engines_key(m))))
    if not ids:
        return [], now
    pipe = redis.pipeline(transaction=False)
    for i in ids:
        pipe.hgetall(engine_key(i))
        pipe.hvals(reserved_key(i))
    res = await pipe.execute()
    out = []
    for k, i in enumerate(ids):
        h, resv = res[2 * k], res[2 * k + 1]
        if not h:
            continue
        reserved = sum(int(v.split(":")[0]) for v in resv)
        out.append(EngineRecord.from_hash(i, h, reserved))
    return out, now


def raise_if_cancelled(error: BaseException) -> None:
    """Re-raise as a cancellation when the current task is being cancelled. The Redis client can turn a
    cancellation that lands mid-command into a connection error; a loop that catches errors to ride out a
    Redis outage would otherwise swallow the cancel and run on (a stopped service that never exits)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from error
