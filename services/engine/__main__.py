import logging
import os
import sys

from services.common import grpc_env

grpc_env.set_defaults()  # before grpc is imported (services/common/grpc_env.py)

from services.engine.server import main  # noqa: E402

rc = main()
# main() returns once everything is closed (server, engine, its workers, Redis, telemetry): leave without the
# interpreter's finalization, which tears torch and the model down object by object (~0.65 s on the CPU machine,
# seconds on a loaded host), so a stopped engine is gone as soon as its drain ends.
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(int(rc or 0))
