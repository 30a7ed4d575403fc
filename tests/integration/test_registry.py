"""The Redis registry's Lua scripts on a real redis-server: atomic choose-and-reserve, freshness, reservations."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from folio.stack import Stack, StackConfig
from services.common import registry
from services.router.registry_client import RegistryClient


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    s = Stack(StackConfig(log_dir=tmp_path_factory.mktemp("redis")))
    url = s.start_redis()
    yield url
    s.stop()


async def _publish(r, engine_id: str, free: int, admitted=(), model="m", ttl_ms=2000, waiting_blocks=0):
    script = r.register_script(registry.PUBLISH_LUA)
    fields = {"address": f"{engine_id}:1", "model": model, "total": 100, "free": free, "evictable": 0,
              "waiting_blocks": waiting_blocks, "running": 0, "waiting": 0, "block_size": 16, "max_model_len": 1024}
    items = [str(x) for kv in fields.items() for x in kv]
    await script(keys=[registry.engine_key(engine_id), registry.engines_key(model), registry.reserved_key(engine_id),
                       registry.MODELS_KEY], args=[ttl_ms, engine_id, model, len(items), *items, *admitted])


def run(coro):
    return asyncio.run(coro)


def test_concurrent_choices_see_each_others_reservations(redis_url):
    async def main():
        r = aioredis.from_url(redis_url + "1", decode_responses=True)
        await r.flushdb()
        await _publish(r, "a", free=10)
        await _publish(r, "b", free=9)
        routers = [RegistryClient(r), RegistryClient(r)]  # two router replicas
        picks = await asyncio.gather(*[routers[i % 2].choose("m", f"req{i}", 5) for i in range(4)])
        ids = [p.engine_id for p in picks]
        # 10 -> a (a: 5 left), 9 -> b (b: 4 left), 5 -> a (a: 0), 4 -> b: never both onto one engine.
        assert sorted(ids) == ["a", "a", "b", "b"]
        assert sum(int(v.split(":")[0]) for v in (await r.hvals(registry.reserved_key("a")))) == 10
        # The engine's next report counts the requests it admitted: their reservations go.
        await _publish(r, "a", free=0, admitted=[f"req{i}" for i, e in enumerate(ids) if e == "a"])
        assert await r.hlen(registry.reserved_key("a")) == 0
        await r.aclose()
    run(main())


def test_waiting_blocks_stale_and_excluded_engines(redis_url):
    async def main():
        r = aioredis.from_url(redis_url + "2", decode_responses=True)
        await r.flushdb()
        await _publish(r, "a", free=50, waiting_blocks=45)  # a long queue eats its free blocks
        await _publish(r, "b", free=20)
        c = RegistryClient(r, stale_ms=300)
        assert (await c.choose("m", "x1", 1)).engine_id == "b"
        assert (await c.choose("m", "x2", 1, exclude={"b"})).engine_id == "a"
        assert await c.choose("m", "x3", 1, exclude={"a", "b"}) is None
        assert await c.choose("other-model", "x4", 1) is None
        await asyncio.sleep(0.4)  # both reports are now older than stale_ms
        await _publish(r, "a", free=50, waiting_blocks=45)
        assert (await c.choose("m", "x5", 1)).engine_id == "a"
        c.mark_suspect("a")  # just failed a call: skipped for a while
        assert await c.choose("m", "x6", 1) is None
        await r.aclose()
    run(main())


def test_expired_engine_is_pruned_and_cached_view_serves_when_redis_is_down(redis_url):
    async def main():
        r = aioredis.from_url(redis_url + "3", decode_responses=True)
        await r.flushdb()
        await _publish(r, "a", free=10, ttl_ms=200)
        await _publish(r, "b", free=5, ttl_ms=5000)
        c = RegistryClient(r)
        await c.refresh()
        assert {e.engine_id for e in c.view} == {"a", "b"} and c.redis_ok
        await asyncio.sleep(0.3)
        assert (await c.choose("m", "y1", 1)).engine_id == "b"
        assert await r.smembers(registry.engines_key("m")) == {"b"}  # the expired id was pruned

        dead = aioredis.from_url("redis://127.0.0.1:1/0", decode_responses=True, socket_connect_timeout=0.2)
        c.redis = dead
        c._choose = dead.register_script(registry.CHOOSE_LUA)
        pick = await c.choose("m", "y2", 3)
        assert pick is not None and pick.from_cache and not c.redis_ok
        await r.aclose()
        await dead.aclose()
    run(main())


def test_predict_names_the_engine_only_when_one_qualifies(redis_url):
    async def main():
        r = aioredis.from_url(redis_url + "4", decode_responses=True)
        await r.flushdb()
        await _publish(r, "b", free=10)
        await _publish(r, "a", free=40)
        c = RegistryClient(r)
        assert c.predict("m") is None  # no view read yet: no guess
        await c.refresh()
        assert c.predict("m") is None  # two qualify: Redis's choice could be either
        assert (await c.choose("m", "t", 1)).engine_id == "a"
        guess = c.predict("m", exclude={"a"})  # one left: the only answer Redis can give
        got = await c.choose("m", "u", 1, exclude={"a"})
        assert (guess.engine_id, guess.address) == (got.engine_id, got.address) == ("b", "b:1")
        assert c.predict("other-model") is None
        c.mark_suspect("b")  # suspects are skipped, as by choose
        assert c.predict("m").engine_id == "a" and (await c.choose("m", "v", 1)).engine_id == "a"
        assert c.predict("m", exclude={"a"}) is None
        await r.aclose()
    run(main())
