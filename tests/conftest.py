"""Test configuration: Triton runs interpreted (numpy, on the CPU) when there is no GPU.

TRITON_INTERPRET is read when a @triton.jit function is defined, so it is set here, before
anything imports the kernels. On a CUDA machine (bench/gpu_check.sh) the same tests run compiled.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_runs() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


TRITON = _triton_runs()
# Every backend that can run here; a missing Triton must fail loudly in CI, not skip quietly.
BACKENDS = ["eager", "triton"] if TRITON else ["eager"]
if os.environ.get("CI") and not TRITON:
    raise RuntimeError("CI must exercise the Triton kernels: install the test extra (triton)")


@pytest.fixture
def device():
    return DEVICE
