"""Test configuration: Triton runs interpreted (numpy, on the CPU) when there is no GPU.

TRITON_INTERPRET is read when a @triton.jit function is defined, so it is set here, before
anything imports the kernels. On a CUDA machine (bench/gpu_check.sh) the same tests run compiled.
"""

import os

import pytest
import torch
from hypothesis import settings

# CI runs the same examples every time (a landing must not hang on a rare draw); locally every
# run explores new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


from snr_triton import backend  # noqa: E402  (after TRITON_INTERPRET is set)
from snr_triton.hyperparams import DEFAULT_HYPER  # noqa: E402

# Every backend of the registry that can run fp32 params here: the shared matrix of tests runs
# over this list, so a new backend is tested by adding it to snr_triton.backend.ORDER. A registry
# that raises here fails every test with its error (the `_setup_error` fixture below) instead of
# stopping pytest while it loads this file, which reads as a usage error (exit code 4, which
# mutmut takes for a broken command rather than a caught mutant).
try:
    BACKENDS = backend.available(torch.device(DEVICE), torch.float32, DEFAULT_HYPER)
    SETUP_ERROR = None
except Exception as error:  # noqa: BLE001  (reported by every test)
    BACKENDS = list(backend.ORDER)
    SETUP_ERROR = f"snr_triton.backend.available() raised {error!r}"


def dtypes_served(name: str) -> list[str]:
    """The param dtypes (snr_triton.check.DTYPES names) that backend `name` steps here."""
    from snr_triton.check import DTYPES

    module = backend.get(name)
    return [k for k, dt in DTYPES.items() if module.unavailable_reason(torch.device(DEVICE), dt, DEFAULT_HYPER) is None]


TRITON = "triton" in BACKENDS
CPU_KERNEL = "cpu" in BACKENDS
# In CI a missing backend fails every test instead of skipping quietly.
if SETUP_ERROR is None and os.environ.get("CI") and not (TRITON and (CPU_KERNEL or DEVICE == "cuda")):
    SETUP_ERROR = "CI must exercise the Triton and CPU kernels: install the test extra, and a C compiler"


@pytest.fixture(autouse=True)
def _setup_error():
    if SETUP_ERROR is not None:
        pytest.fail(SETUP_ERROR, pytrace=False)


@pytest.fixture
def device():
    return DEVICE


def installed_distribution():
    """snr-triton's installed distribution, or a skip: a bare source tree on PYTHONPATH (as
    bench/gpu_check.sh runs it) has none."""
    import importlib.metadata

    try:
        return importlib.metadata.distribution("snr-triton")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("snr-triton is not installed (running from a bare source tree)")


def step_beside_reference(theta, grads, backend, hp):
    """One param from `theta` stepped by SNRAdamW(backend, **hp) and by the float64 reference over
    the same `grads`: (the param, its optimizer, the reference's float64 theta)."""
    from snr_triton import SNRAdamW, reference

    p = torch.nn.Parameter(theta.clone().to(DEVICE))
    opt = SNRAdamW([p], backend=backend, **hp)
    ref_theta, ref_state = theta.double(), reference.new_state(theta)
    for g in grads:
        p.grad = g.to(DEVICE)
        opt.step()
        reference.reference_step(ref_theta, g.double(), ref_state, **hp)
    return p, opt, ref_theta


def warned_from(said, path: str) -> list[str]:
    """The files the warnings in `said` point at, with mutmut's trampoline counted as `path`: under
    bench/mutmut.sh each mutated function is called through mutmut.mutation.trampoline, a frame
    between the caller and snr_triton, where warn_user's walk then stops (warn.py itself is not
    among the modules mutmut mutates)."""
    import sys

    trampoline = sys.modules.get("mutmut.mutation.trampoline")
    inserted = {trampoline.__file__} if trampoline is not None else set()
    return [path if w.filename in inserted else w.filename for w in said]

