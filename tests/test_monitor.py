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
    with pytest.raises(RuntimeError) as e:
        opt.stats()
    assert str(e.value) == "stats() needs SNRAdamW(..., track_stats=True)"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_zero_grad_is_neither_above_the_noise_nor_gated_open(backend):
    """m-hat = s-hat = 0 (a first step of zero grads): m-hat^2 > alpha*s-hat is false and q = 0, so
    frac_above and mean_gate are 0, the sums 0 (a tie 0 = 0 counted as above would read 1)."""
    p = torch.nn.Parameter(torch.ones(6, device=DEVICE))
    opt = SNRAdamW([p], backend=backend, track_stats=True)
    p.grad = torch.zeros(6, device=DEVICE)
    opt.step()
    assert opt.stats()["frac_above"] == 0.0 and opt.stats()["mean_gate"] == 0.0
    assert opt.stats()["signal"] == 0.0 and opt.stats()["noise"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_of_a_group_or_a_step_that_stepped_nothing(backend):
    """Before any step, and for a param group none of whose params had a grad: no elements, so
    mean_gate and frac_above are NaN and the sums 0 (not an error)."""
    a, b = torch.nn.Parameter(torch.ones(4, device=DEVICE)), torch.nn.Parameter(torch.ones(3, device=DEVICE))
    opt = SNRAdamW([{"params": [a]}, {"params": [b]}], backend=backend, alpha=0.25, track_stats=True)
    nothing = {"mean_gate": math.nan, "frac_above": math.nan, "signal": 0.0, "noise": 0.0}

    def assert_nothing(got):
        assert {k: got[k] for k in nothing} == pytest.approx(nothing, nan_ok=True)

    assert_nothing(opt.stats())
    assert len(opt.stats()["groups"]) == 2
    for g in opt.stats()["groups"]:
        assert_nothing(g)
    a.grad = torch.full((4,), 0.5, device=DEVICE)  # group 1 has no grad
    opt.step()
    stats = opt.stats()
    # step 1: s-hat is m-hat^2, so q = 1 / (1 + alpha) everywhere
    assert stats["mean_gate"] == pytest.approx(0.8) and stats["groups"][0]["mean_gate"] == pytest.approx(0.8)
    assert_nothing(stats["groups"][1])
    assert stats["skipped_steps"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_param_stats_match_reference(backend):
    """stats(per_param=True): each named param's own statistics (several blocks per tensor too)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 60), torch.nn.Tanh(), torch.nn.Linear(60, 3)).to(DEVICE)
    names = [n for n, _ in model.named_parameters()]
    opt = SNRAdamW(model.named_parameters(), lr=1e-2, alpha=0.7, gate="soft", backend=backend, track_stats=True)
    refs = [p.detach().clone().cpu() for p in model.parameters()]
    states = [reference.new_state(r) for r in refs]
    hp = dict(lr=1e-2, betas=(0.9, 0.999), rho=0.99, eps=1e-8, weight_decay=1e-2, gate="soft", alpha=0.7,
              softness=1.0, gate_eps=1e-16, warmup_steps=0, maximize=False)
    for k in range(3):
        model.zero_grad()
        model(torch.randn(8, 40, device=DEVICE)).pow(2).mean().backward()
        grads = [p.grad.detach().cpu() for p in model.parameters()]
        opt.step()
        outs = [reference.reference_step(r, g, s, **hp) for r, g, s in zip(refs, grads, states)]
    per_param = opt.stats(per_param=True)["params"]
    assert list(per_param) == names
    for name, out in zip(names, outs):
        want = reference_stats([{**out, "alpha": 0.7}])
        for key in ("mean_gate", "frac_above", "signal", "noise"):
            assert math.isclose(per_param[name][key], want[key], rel_tol=1e-5, abs_tol=1e-6), (name, key)


def test_per_param_stats_need_named_parameters():
    p = torch.nn.Parameter(torch.ones(2))
    opt = SNRAdamW([p], track_stats=True)
    p.grad = torch.ones(2)
    opt.step()
    with pytest.raises(ValueError) as e:
        opt.stats(per_param=True)
    assert str(e.value) == ("stats(per_param=True) needs named parameters: pass model.named_parameters() "
                            "(or groups of (name, param) pairs) to SNRAdamW")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_after_a_skipped_step_count_nothing(backend):
    """Issue 24: a GradScaler-skipped step (found_inf != 0) steps no element, so the stats are those
    of an empty step: mean_gate and frac_above NaN (0/0), signal and noise 0, per group too.
    Counting the skipped elements (mean_gate 0.0) passed every test before."""
    p = torch.nn.Parameter(torch.randn(64, device=DEVICE))
    opt = SNRAdamW([p], backend=backend, track_stats=True)
    p.grad = torch.randn(64, device=DEVICE)
    opt.step()
    assert opt.stats()["mean_gate"] > 0
    p.grad = torch.randn(64, device=DEVICE)
    opt.step(grad_scale=torch.tensor(1.0, device=DEVICE), found_inf=torch.tensor(1.0, device=DEVICE))
    stats = opt.stats()
    for where in (stats, stats["groups"][0]):
        assert math.isnan(where["mean_gate"]) and math.isnan(where["frac_above"])
        assert where["signal"] == 0 and where["noise"] == 0
    assert opt.state[p]["step"].item() == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["snr", "soft", "hard"])
def test_the_gate_is_closed_where_there_is_no_signal_and_no_noise(backend, gate):
    """m = s = 0 (zero grads from a fresh state): ALGORITHM.md's q = m-hat^2 / (m-hat^2 + ... + delta)
    is 0 there (the reference's too), whatever rounding a kernel does elsewhere; it moves nothing
    (q * m = 0), so only the statistics can tell."""
    p = torch.nn.Parameter(torch.ones(40, device=DEVICE))
    opt = SNRAdamW([p], backend=backend, gate=gate, track_stats=True, weight_decay=0.0)
    p.grad = torch.zeros(40, device=DEVICE)
    opt.step()
    ref = reference.reference_step(torch.ones(40, dtype=torch.float64), torch.zeros(40, dtype=torch.float64),
                                   reference.new_state(torch.ones(40)), **{**hyper(Case(gate=gate))[0], "weight_decay": 0.0})
    assert ref["q"].abs().max().item() == 0
    assert opt.stats()["mean_gate"] == 0 and torch.equal(p.detach(), torch.ones(40, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_param_stats_of_active_sets_of_different_sizes_are_each_params_own(backend):
    """A bucket keeps a stats buffer per active-set size: steps over 2, 4, another 2, then 4
    params of one bucket each report every stepped param's own sums, and only those params. The
    truth: each param stepped by an optimizer of its own."""
    from snr_triton import SNRAdamW

    gen = torch.Generator().manual_seed(9)
    init = {k: torch.randn(7, generator=gen).to(DEVICE) for k in "abcd"}
    hp = dict(lr=1e-2, gate="snr", alpha=0.7, backend=backend, track_stats=True)
    ours = {k: torch.nn.Parameter(x.clone()) for k, x in init.items()}
    opt = SNRAdamW(list(ours.items()), **hp)
    alone = {k: torch.nn.Parameter(x.clone()) for k, x in init.items()}
    solos = {k: SNRAdamW([(k, p)], **hp) for k, p in alone.items()}
    for active in ("ab", "abcd", "cd", "abcd"):
        for k in "abcd":
            g = torch.randn(7, generator=gen).to(DEVICE) if k in active else None
            ours[k].grad, alone[k].grad = g, None if g is None else g.clone()
        opt.step()
        for k in active:
            solos[k].step()
        per_param = opt.stats(per_param=True)["params"]
        assert set(per_param) == set(active)
        for k in active:
            assert torch.equal(ours[k].detach(), alone[k].detach()), (active, k)
            want = solos[k].stats(per_param=True)["params"][k]
            for key, value in want.items():
                assert per_param[k][key] == pytest.approx(value, rel=1e-6), (active, k, key)
