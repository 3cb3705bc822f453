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


def _cpu_kernel_runs() -> bool:
    from snr_triton.cpu_backend import cpu_unavailable_reason

    return DEVICE == "cpu" and cpu_unavailable_reason() is None


TRITON = _triton_runs()
CPU_KERNEL = _cpu_kernel_runs()
# Every backend that can run here; in CI a missing one fails loudly instead of skipping quietly.
BACKENDS = ["eager"] + (["cpu"] if CPU_KERNEL else []) + (["triton"] if TRITON else [])
if os.environ.get("CI") and not (TRITON and (CPU_KERNEL or DEVICE == "cuda")):
    raise RuntimeError("CI must exercise the Triton and CPU kernels: install the test extra, and a C compiler")


@pytest.fixture
def device():
    return DEVICE
