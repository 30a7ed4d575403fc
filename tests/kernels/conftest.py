"""Kernel tests run under the Triton interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any module defining a @triton.jit kernel is imported.
On a GPU machine the same tests run compiled on the device.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
