"""The engine-load record is the one shape of an engine's load: its Redis hash and protobuf forms round-trip,
cover every field of the messages that carry it, and keep the hash field names the registry's Lua reads."""

from __future__ import annotations

import dataclasses

from protos.gen.folio.v1 import engine_pb2, router_pb2
from services.common import registry
from services.common.engine_load import EngineLoad
from services.common.registry import EngineRecord

LOAD = EngineLoad(total_blocks=100, free_blocks=40, evictable_blocks=10, waiting_blocks=7, running=3, waiting=2,
                  block_size=32, num_preemptions=5, prefix_cache_queries=640, prefix_cache_hits=320, steps=99)


def test_every_field_is_distinct_so_a_swapped_conversion_would_show():
    values = [getattr(LOAD, f.name) for f in dataclasses.fields(EngineLoad)]
    assert len(set(values)) == len(values)


def test_derived_values():
    assert LOAD.kv_usage == 0.5  # 100 - 40 free - 10 evictable = 50 in use
    assert LOAD.available_blocks == 40 + 10 - 7
    assert EngineLoad().kv_usage == 0.0  # an empty pool is not in use, not a division by zero


def test_hash_round_trip_and_the_names_the_registry_lua_reads():
    h = LOAD.to_hash()
    assert all(isinstance(v, str) for v in h.values())  # Redis hands strings back
    assert EngineLoad.from_hash(h) == LOAD
    # The wire names routers and the choose script rely on (docs/router.md, registry.CHOOSE_LUA).
    assert {k: h[k] for k in ("total", "free", "evictable", "waiting_blocks", "running", "waiting", "block_size")} == {
        "total": "100", "free": "40", "evictable": "10", "waiting_blocks": "7", "running": "3", "waiting": "2",
        "block_size": "32"}
    for name in ("'free'", "'evictable'", "'waiting_blocks'", "'running'", "'waiting'", "'address'", "'ts'"):
        assert name in registry.CHOOSE_LUA


def test_a_hash_missing_fields_reads_as_defaults():
    assert EngineLoad.from_hash({"total": "8", "free": "8"}) == EngineLoad(total_blocks=8, free_blocks=8)


def test_stats_proto_carries_every_field_and_round_trips():
    msg = LOAD.fill_pb(engine_pb2.EngineStatsResponse())
    load_names = {f.name for f in dataclasses.fields(EngineLoad)}
    assert set(engine_pb2.EngineStatsResponse.DESCRIPTOR.fields_by_name) == load_names | {"kv_usage"}
    assert msg.kv_usage == 0.5 and msg.free_blocks == 40 and msg.steps == 99 and msg.prefix_cache_hits == 320
    assert EngineLoad.from_pb(engine_pb2.EngineStatsResponse.FromString(msg.SerializeToString())) == LOAD


def test_registry_record_hash_and_router_proto():
    rec = EngineRecord(engine_id="e1", address="host:5", model="m", max_model_len=2048, load=LOAD)
    h = rec.to_hash()
    assert h["address"] == "host:5" and h["model"] == "m" and h["max_model_len"] == "2048" and "ts" not in h
    back = EngineRecord.from_hash("e1", {**h, "ts": "1234"}, reserved=4)
    assert back == dataclasses.replace(rec, ts_ms=1234, reserved_blocks=4)
    assert back.available_blocks == LOAD.available_blocks - 4
    state = back.fill_pb(router_pb2.EngineState())
    assert (state.engine_id, state.address, state.model, state.total_blocks, state.free_blocks,
            state.evictable_blocks, state.waiting_blocks, state.running, state.waiting, state.reserved_blocks) == (
        "e1", "host:5", "m", 100, 40, 10, 7, 3, 2, 4)
