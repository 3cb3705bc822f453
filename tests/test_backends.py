"""Every backend against the float64 reference over the full hyperparameter grid.

Each case has two param groups with different hyperparameters and a zero-size param,
and runs 10 steps (snr_triton.check documents the tolerances: n ulps of the param dtype).
"""

import itertools

import pytest
import torch

from conftest import BACKENDS, DEVICE
from snr_triton.check import Case, passes, run_case, tolerances

GRID = list(itertools.product(["snr", "soft", "hard", "none"], [False, True], [0.0, 1e-2], [0, 3]))


def dtypes_for(backend):
    return {"triton": ["fp32", "bf16", "fp16"], "cpu": ["fp32", "bf16"]}.get(backend, ["fp32", "fp64", "bf16"])


CASES = [(b, d, *g) for b in BACKENDS for d in dtypes_for(b) for g in GRID]


@pytest.mark.parametrize("backend,dtype,gate,maximize,weight_decay,warmup", CASES)
def test_against_reference(backend, dtype, gate, maximize, weight_decay, warmup):
    case = Case(gate=gate, dtype=dtype, maximize=maximize, weight_decay=weight_decay, warmup_steps=warmup)
    err = run_case(case, backend, DEVICE)
    assert passes(case, err), (err, tolerances(case))


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_one_at_the_degenerate_first_step(backend):
    """alpha = 1, no warmup: at t = 1 m-hat^2 == s-hat; the smooth gates stay well conditioned."""
    for gate in ("snr", "soft"):
        case = Case(gate=gate, alpha=1.0)
        err = run_case(case, backend, DEVICE)
        assert passes(case, err), err


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_sizes(backend):
    """Sizes around the kernel's block boundaries, several tensors in one bucket."""
    case = Case(sizes=(1, 7, 1023, 1024, 1025, 4097, 0), steps=4)
    err = run_case(case, backend, DEVICE)
    assert passes(case, err), err


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_states_track_the_reference(backend):
    """state_dtype=bfloat16 computes the same math as the reference storing its states in bf16."""
    case = Case(state_dtype=torch.bfloat16)
    err = run_case(case, backend, DEVICE)
    assert passes(case, err), err


def test_eager_steps_large_tensors_in_bounded_pieces(monkeypatch):
    """Eager splits big tensors into pieces and batches (bounded temporaries): same results."""
    from snr_triton.backend import eager

    monkeypatch.setattr(eager, "PIECE", 64)
    monkeypatch.setattr(eager, "BATCH", 256)
    for gate in ("snr", "hard"):
        case = Case(gate=gate, sizes=(1000, 7, 300, 0), steps=4)
        err = run_case(case, "eager", DEVICE)
        assert passes(case, err), err
