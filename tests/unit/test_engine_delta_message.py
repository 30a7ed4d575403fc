"""The engine's message of a request's deltas (services/engine/server.py: delta_message): the first one carries
the first token's hops, also when it is the request's last (every token merged into one message)."""

from __future__ import annotations

import time

from services.common.outputs import RequestDelta, SequenceDelta
from services.engine.server import _Progress, delta_message


def _delta(tokens: list[int], finished: bool, t0: float) -> RequestDelta:
    return RequestDelta("r", [SequenceDelta(0, tokens, None, -1.0, "length" if finished else None)], finished,
                        arrival_time=t0, first_scheduled_time=t0 + 0.001, first_token_time=t0 + 0.002)


def test_a_first_message_that_is_also_the_last_keeps_the_first_token_path():
    t0 = time.monotonic()
    prog = _Progress(3, received_ns=int((t0 - 0.001) * 1e9))
    msg = delta_message([_delta([5, 6], False, t0), _delta([7], True, t0)], prog)
    hops = [s.hop for s in msg.timing.first_token_path]
    assert hops[:2] == ["engine.received", "engine.admitted"] and "engine.first_token" in hops and hops[-1] == "engine.sent"
    assert msg.timing.total_ns > 0
    assert abs(msg.timing.time_to_first_token_ns - 2_000_000) < 1000 and abs(msg.timing.queue_ns - 1_000_000) < 1000
    assert msg.finished and msg.usage.completion_tokens == 3


def test_later_messages_carry_no_path():
    t0 = time.monotonic()
    prog = _Progress(3, received_ns=int(t0 * 1e9))
    first = delta_message([_delta([5], False, t0)], prog)
    last = delta_message([_delta([6], True, t0)], prog)
    assert first.timing.first_token_path and not last.timing.first_token_path
    assert last.timing.total_ns > 0
