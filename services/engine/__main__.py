import sys

from services.common import grpc_env

grpc_env.set_defaults()  # before grpc is imported (services/common/grpc_env.py)

from services.engine.server import main  # noqa: E402

sys.exit(main())
