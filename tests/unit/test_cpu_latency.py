"""--cpu-wake-latency-us (services/common/cpu_latency.py): the PM QoS request is the 32-bit value written to the
file, held while the handle is open; a host that does not let the process ask leaves it running as before."""

from __future__ import annotations

import logging
import os
import struct

import pytest

from services.common import cpu_latency


def test_the_request_is_the_value_written_and_held_until_released(tmp_path):
    path = tmp_path / "cpu_dma_latency"
    path.write_bytes(b"")
    held = cpu_latency.hold(0, str(path))
    assert held is not None and held.latency_us == 0
    assert struct.unpack("=i", path.read_bytes()) == (0,)
    os.fstat(held.fd)  # open while held
    held.release()
    with pytest.raises(OSError):
        os.fstat(held.fd if held.fd >= 0 else 10**6)
    held.release()  # twice: a no-op


def test_a_host_that_does_not_allow_it_is_logged_and_left_alone(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="folio.cpu_latency"):
        assert cpu_latency.hold(5, str(tmp_path / "missing" / "cpu_dma_latency")) is None
    assert "cpu_wake_latency_us 5: not held" in caplog.text


def test_a_negative_latency_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="cpu_wake_latency_us: must be >= 0"):
        cpu_latency.hold(-1)
