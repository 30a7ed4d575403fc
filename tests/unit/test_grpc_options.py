"""Client keepalive and server ping policy agree (else servers answer GOAWAY too_many_pings)."""

from services.common.server import CHANNEL_OPTIONS, SERVER_OPTIONS


def test_servers_accept_the_pings_clients_send():
    client, server = dict(CHANNEL_OPTIONS), dict(SERVER_OPTIONS)
    assert client["grpc.keepalive_permit_without_calls"] == 1
    # a client pings every keepalive_time_ms; the server must tolerate at least that rate, idle or not
    assert server["grpc.http2.min_recv_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    assert client["grpc.http2.max_pings_without_data"] == 0
    assert client["grpc.keepalive_timeout_ms"] < client["grpc.keepalive_time_ms"]
