"""gRPC core settings that must be in the environment before grpc is imported: each service's __main__ sets them first.

GRPC_EXPERIMENTS: gRPC's EventEngine experiments off (its client, listener and other endpoints), so a
message's bytes are read by the thread that polls the completion queue (grpc.aio's poller thread) instead of
an EventEngine thread that then wakes it: one thread wake-up fewer per message. On the H200 host (a VM
whose idle vCPUs halt, so a wake-up costs ~0.2 ms: bench/grpc_hops.py, raw against raw-spin) a message on
an open stream crossed in 322 / 127 µs (one way, each direction) with them off against 415 / 279 µs with
them on (p50; bench/results/history_router.md, "The crossing's floor"). A value already in the environment is kept (an
empty one: gRPC's own defaults).
"""

from __future__ import annotations

import logging
import os
import sys

GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"


def set_defaults() -> None:
    """Put Folio's gRPC core settings in the environment unless set there already; call before importing grpc
    (grpc reads them once, when it is imported)."""
    if "grpc" in sys.modules:
        logging.getLogger("folio.grpc_env").warning(
            "grpc was imported before its settings were made: GRPC_EXPERIMENTS=%s has no effect in this process",
            GRPC_EXPERIMENTS)
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
