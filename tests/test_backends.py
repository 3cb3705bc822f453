"""The shared matrix: every backend against the float64 reference over the hyperparameter grid.

Each case has two param groups with different hyperparameters and a zero-size param,
and runs 10 steps (snr_triton.check documents the tolerances: n ulps of the param dtype).
"""

import itertools

import pytest
import torch

from conftest import BACKENDS, DEVICE, dtypes_served
from snr_triton import SNRAdamW
from snr_triton.check import DTYPES, Case, passes, run_case, tolerances

GRID = list(itertools.product(["snr", "soft", "hard", "none"], [False, True], [0.0, 1e-2], [0, 3]))


CASES = [(b, d, *g) for b in BACKENDS for d in dtypes_served(b) for g in GRID]


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


@pytest.mark.parametrize("backend,dtype", [(b, d) for b in BACKENDS for d in dtypes_served(b)])
def test_first_step_tie_is_decided_by_the_rule_not_by_rounding(backend, dtype):
    """ALGORITHM.md: at t = 1 the gate uses s-hat := m-hat^2. With the hard gate at alpha = 1
    (m-hat^2 > m-hat^2 is false) nothing moves; at alpha = 0.999 every coordinate with a grad does."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(4097, generator=gen).to(DTYPES[dtype]).to(DEVICE)
    grad = torch.randn(4097, generator=gen).to(DTYPES[dtype]).to(DEVICE)
    grad[::7] = 0
    for alpha, moves in ((1.0, False), (0.999, True)):
        p = torch.nn.Parameter(theta.clone())
        opt = SNRAdamW([p], lr=0.05, gate="hard", alpha=alpha, weight_decay=0.0, backend=backend)
        p.grad = grad.clone()
        opt.step()
        moved = p.detach() != theta
        assert torch.equal(moved, (grad != 0) if moves else torch.zeros_like(moved)), (alpha, moved.sum())


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("moved", [0.0, 0.5])
def test_the_check_catches_params_that_move_too_little(dtype, moved):
    """Issue 24: with a tolerance of steps x eps(dtype) relative to max |param| (0.078 for bf16),
    a backend that never moved its params scored 0.036 and passed. Made-up results that move
    the params not at all, or half as far as the reference, must fail; the reference's own pass."""
    from snr_triton.check import errors, simulate

    case = Case(dtype=dtype)
    params, ours, opt, refs, states = simulate(case, "eager")
    assert passes(case, errors(case, params, ours, opt, refs, states))
    lazy = [(p0.double() + moved * (r.double() - p0.double())).to(p0.dtype) for p0, r in zip(params, refs)]
    for p, q in zip(ours, lazy):
        p.data = q
    err = errors(case, params, ours, opt, refs, states)
    assert not passes(case, err), err
    assert err["displacement"] >= 0.4
