import sys

from services.engine.server import main

sys.exit(main())
