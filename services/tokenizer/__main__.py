from services.common import grpc_env

grpc_env.set_defaults()  # before grpc is imported (services/common/grpc_env.py)

from services.common.server import leave  # noqa: E402
from services.tokenizer.server import main  # noqa: E402

leave(main())  # without the interpreter's finalization (services/common/server.py)
