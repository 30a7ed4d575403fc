"""GPU tests: each module skips itself where CUDA is absent.

Sets the same import-time state as tests/kernels/conftest.py, so collecting this folder first on a
CPU machine cannot import the kernels compiled-mode before the interpreter flag is set.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for path in (_ROOT, os.path.join(_ROOT, "tests", "kernels")):
    if path not in sys.path:
        sys.path.insert(0, path)
