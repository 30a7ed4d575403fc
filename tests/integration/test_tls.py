"""The router serves its gRPC and HTTP APIs over TLS when given a certificate and key, and only TLS."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from folio.stack import ROOT, free_port

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary to make a certificate")


@pytest.fixture(scope="module")
def tls_router(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    port, http_port = free_port(), free_port()
    # No Redis behind it: the router starts, answers health (NOT_SERVING: no engine) and HTTP /health (503).
    p = subprocess.Popen([sys.executable, "-m", "services.router", "--port", str(port), "--http-port", str(http_port),
                          "--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--tls-cert-file", str(cert),
                          "--tls-key-file", str(key), "--no-warm-structured"], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    yield p, port, http_port, cert.read_bytes(), str(cert)
    p.terminate()
    p.wait(30)


def _wait(fn, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except (grpc.RpcError, httpx.TransportError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_grpc_over_tls_and_not_plaintext(tls_router):
    p, port, _, cert, _ = tls_router
    creds = grpc.ssl_channel_credentials(root_certificates=cert)
    with grpc.secure_channel(f"localhost:{port}", creds) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        r = _wait(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=2))
        assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert p.poll() is None


def test_http_over_tls_and_not_plaintext(tls_router):
    p, _, http_port, _, cert_path = tls_router
    ctx = ssl.create_default_context(cafile=cert_path)
    r = _wait(lambda: httpx.get(f"https://localhost:{http_port}/health", verify=ctx, timeout=2))
    assert r.status_code == 503  # served over TLS; no engine behind this router
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=2)
    assert p.poll() is None
