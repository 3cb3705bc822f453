"""opt.stats(): the gate statistics of the last step, against the float64 reference."""

import math

import pytest
import torch

from conftest import BACKENDS, DEVICE
from snr_triton import SNRAdamW, reference
from snr_triton.check import Case, hyper, make_problem


def reference_stats(parts):
    q = torch.cat([p["q"].flatten() for p in parts])
    mhat = torch.cat([p["mhat"].flatten() for p in parts])
    noise = torch.cat([(p["alpha"] * p["shat"]).flatten() for p in parts])
    return {"mean_gate": q.mean().item(), "frac_above": (mhat**2 > noise).double().mean().item(),
            "signal": (mhat**2).sum().item(), "noise": noise.sum().item()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["snr", "soft", "hard", "none"])
def test_stats_match_reference(backend, gate):
    case = Case(gate=gate, sizes=(50, 1, 0), steps=4, warmup_steps=0)
    params, grads = make_problem(case, DEVICE)
    g0, g1 = hyper(case)
    opt = SNRAdamW([{"params": params[:-1], **g0}, {"params": params[-1:], **g1}], backend=backend,
                   track_stats=True)
    refs = [p.detach().clone() for p in params]
    states = [reference.new_state(p) for p in refs]
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        parts = []
        for i, (r, g) in enumerate(zip(refs, gs)):
            hp = g0 if i < len(refs) - 1 else g1
            out = reference.reference_step(r, g, states[i], **hp)
            parts.append({**out, "alpha": hp["alpha"]})
    stats = opt.stats()
    expected_groups = [reference_stats(parts[:-1]), reference_stats(parts[-1:])]
    expected_all = reference_stats(parts)
    for got, want in [(stats, expected_all)] + list(zip(stats["groups"], expected_groups)):
        for key in ("mean_gate", "frac_above", "signal", "noise"):
            assert math.isclose(got[key], want[key], rel_tol=1e-5, abs_tol=1e-6), (key, got, want)


def test_stats_need_track_stats():
    opt = SNRAdamW([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(RuntimeError, match="track_stats=True"):
        opt.stats()
