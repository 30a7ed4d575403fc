"""The router's HTTP connections have Nagle's algorithm off (TCP_NODELAY): asyncio sets it only on sockets
whose protocol says TCP, and the router's own listening socket did not, so an event written right after a
response's head waited for the client's delayed ACK (~40 ms: H200 round 1, and the CPU machine's
bench/serving.py --apis http, router.sent -> client.received 42-45 ms on the slowest first tokens)."""

from __future__ import annotations

import asyncio
import socket

from folio.stack import free_port
from services.router.metrics import RouterMetrics
from services.router.server import RouterConfig, _HttpServer
from tests.unit.router_fakes import FakeEngine, make_router


def test_accepted_http_connections_have_nagle_off():
    r = make_router(a=FakeEngine())
    c = RouterConfig(http_port=free_port())

    async def main():
        http = _HttpServer(r.core, RouterMetrics(r.core), c)
        assert http.sock.proto == socket.IPPROTO_TCP
        http.start()
        try:
            for _ in range(100):
                if http.server.started:
                    break
                await asyncio.sleep(0.02)
            reader, writer = await asyncio.open_connection(c.host, c.http_port)
            try:
                for _ in range(100):
                    if http.server.server_state.connections:
                        break
                    await asyncio.sleep(0.02)
                (conn,) = http.server.server_state.connections
                sock = conn.transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            finally:
                writer.close()
        finally:
            await http.stop()

    asyncio.run(main())
