"""--cpu-wake-latency-us (services/common/cpu_latency.py): the PM QoS request asks for the latency (the 32-bit
value written to the file) while requests are in flight and for the linger after the last, and nothing
otherwise; a host that does not let the process ask leaves it running as before."""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from services.common import cpu_latency


class _Recorded:
    """A stand-in for /dev/cpu_dma_latency: a regular file appended to, so every value written is kept."""

    def __init__(self, tmp_path):
        self.path = tmp_path / "cpu_dma_latency"
        self.path.write_bytes(b"")

    def values(self) -> list[int]:
        data = self.path.read_bytes()
        return [v for (v,) in struct.iter_unpack("=i", data)]


def test_asked_while_requests_are_in_flight_and_lifted_after_the_linger(tmp_path):
    f = _Recorded(tmp_path)
    req = cpu_latency.open_request(0, str(f.path), linger_s=0.05)
    assert req is not None and f.values() == [cpu_latency.NO_LIMIT_US]  # open, asking nothing yet

    async def run():
        with req.hold():
            with req.hold():  # a second request in flight: no second write
                assert f.values()[-1] == 0 and req.on
        await asyncio.sleep(0.02)
        with req.hold():  # a request within the linger: still on, nothing written
            pass
        await asyncio.sleep(0.03)
        assert req.on  # the linger counts from the last request's end
        await asyncio.sleep(0.06)
        assert not req.on

    asyncio.run(run())
    assert f.values() == [cpu_latency.NO_LIMIT_US, 0, cpu_latency.NO_LIMIT_US]
    req.close()
    req.close()  # twice: a no-op


def test_a_host_that_does_not_allow_it_is_logged_and_left_alone(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="folio.cpu_latency"):
        assert cpu_latency.open_request(5, str(tmp_path / "missing" / "cpu_dma_latency")) is None
    assert "cpu_wake_latency_us 5: not held" in caplog.text


def test_a_negative_latency_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="cpu_wake_latency_us: must be >= 0"):
        cpu_latency.open_request(-1)


def test_an_engine_holds_it_only_when_asked():
    from services.engine.server import EngineServerConfig

    assert EngineServerConfig().wake_latency_us() is None
    assert EngineServerConfig(cpu_wake_latency_us=-1).wake_latency_us() is None
    assert EngineServerConfig(cpu_wake_latency_us=0).wake_latency_us() == 0
    assert EngineServerConfig(cpu_wake_latency_us=50).wake_latency_us() == 50
    with pytest.raises(ValueError, match="cpu_wake_latency_us: must be >= 0, or -1"):
        EngineServerConfig(cpu_wake_latency_us=-2)
