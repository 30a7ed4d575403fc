"""`python -m services.common.healthcheck HOST:PORT [SERVICE]`: exit 0 if the gRPC health check says SERVING.

For container health checks (docker-compose) where no grpc_health_probe binary is installed;
Kubernetes uses its built-in gRPC probes instead.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    service = argv[1] if len(argv) > 1 else ""
    with grpc.insecure_channel(argv[0]) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
        except grpc.RpcError as e:
            print(f"{argv[0]}: {e.code().name}", file=sys.stderr)
            return 1
    ok = r.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{argv[0]}: {health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
