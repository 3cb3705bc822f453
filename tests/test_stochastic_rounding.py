"""Stochastic rounding of bf16 params: unbiased, and a random stream of its own for every param."""

import pytest
import torch

from conftest import BACKENDS, DEVICE
from snr_triton import SNRAdamW

SR_BACKENDS = [b for b in BACKENDS if b != "cpu"]  # the C kernel has none (it refuses, tested there)


@pytest.mark.parametrize("backend", SR_BACKENDS)
def test_stochastic_rounding_is_unbiased(backend):
    """An update of 0.3 bf16 ulp: nearest rounding never moves, stochastic moves 30% of elements."""
    n, ulp = 8192, 2.0**-7  # bf16 spacing in [1, 2)
    results = {}
    for sr in (False, True):
        w = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device=DEVICE))
        opt = SNRAdamW([w], lr=0.3 * ulp, gate="none", weight_decay=0.0, backend=backend,
                       stochastic_rounding=sr)
        w.grad = -torch.ones_like(w)  # first Adam step: lr * g/(|g| + eps), so +0.3 ulp
        opt.step()
        results[sr] = (w.float() - 1.0) / ulp
    assert torch.all(results[False] == 0)
    frac_up = (results[True] == 1).float().mean().item()
    assert torch.all((results[True] == 0) | (results[True] == 1))
    assert abs(frac_up - 0.3) < 0.03  # 6 standard deviations of the mean at n = 8192


def _sr_run(backend, groups, steps=1, n=4096, ulp=2.0**-7):
    """bf16 params of ones, each in `groups` (list of group indices), stepped by +0.3 ulp per step."""
    params = [torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device=DEVICE)) for _ in groups]
    spec = {}
    for p, gi in zip(params, groups):
        spec.setdefault(gi, []).append(p)
    opt = SNRAdamW([{"params": ps} for _, ps in sorted(spec.items())], lr=0.3 * ulp, gate="none",
                   weight_decay=0.0, backend=backend, stochastic_rounding=True)
    for _ in range(steps):
        for p in params:
            p.grad = -torch.ones_like(p)  # constant grad: every Adam step is exactly +lr
        opt.step()
    return [(p.float() - 1.0) / ulp for p in params]


@pytest.mark.parametrize("backend", SR_BACKENDS)
def test_every_param_has_its_own_random_stream(backend):
    """Two identical tensors, in one group or in two, get independent rounding decisions
    (agreement ~ 0.3^2 + 0.7^2 = 0.58, not 1); the same setup rounds the same way twice."""
    for groups in ([0, 0], [0, 1]):
        a, b = _sr_run(backend, groups)
        agree = (a == b).float().mean().item()
        assert abs(agree - 0.58) < 0.05, (groups, agree)
    first, again = _sr_run(backend, [0, 1]), _sr_run(backend, [0, 1])
    assert all(torch.equal(x, y) for x, y in zip(first, again))


@pytest.mark.parametrize("backend", SR_BACKENDS)
def test_stochastic_rounding_stays_unbiased_over_many_steps(backend):
    """20 steps of +0.3 ulp: nearest rounding would never move; stochastic moves 6 ulp on average
    (per-element spread ~2 ulp, so the mean over 4096 elements is within 0.15 of 6)."""
    (moved,) = _sr_run(backend, [0], steps=20)
    assert abs(moved.mean().item() - 6.0) < 0.15
    assert moved.std().item() > 1.0  # random, not a deterministic 6


def test_eager_stochastic_rounding_gives_each_piece_its_own_stream():
    """Issue 24: the eager backend steps tensors above 2^20 elements in pieces, each with the seed
    `param seed + k`; nothing tested it. A 2^21-element param is two pieces: with one stream for
    both, their rounding decisions would repeat element for element. Both stay unbiased."""
    from snr_triton.backend import eager

    n, ulp = 2 * eager.PIECE, 2.0**-7
    w = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = SNRAdamW([w], lr=0.3 * ulp, gate="none", weight_decay=0.0, backend="eager", stochastic_rounding=True)
    w.grad = -torch.ones_like(w)
    opt.step()
    up = ((w.float() - 1.0) / ulp).round()
    first, second = up[: eager.PIECE], up[eager.PIECE:]
    assert not torch.equal(first, second)
    assert (first == second).float().mean().item() < 0.7  # independent: 0.3^2 + 0.7^2 = 0.58 agree
    for part in (first, second):
        assert abs(part.mean().item() - 0.3) < 0.01
