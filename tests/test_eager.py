"""What only the eager backend has: bounded temporaries for large tensors."""

import pytest
import torch

from conftest import DEVICE, step_beside_reference
from snr_triton import SNRAdamW, reference
from snr_triton.backend import eager
from snr_triton.check import Case, passes, run_case
from snr_triton.hyperparams import DEFAULTS


def test_eager_steps_large_tensors_in_bounded_pieces(monkeypatch):
    """Eager splits big tensors into pieces and batches (bounded temporaries): same results."""
    monkeypatch.setattr(eager, "PIECE", 64)
    monkeypatch.setattr(eager, "BATCH", 256)
    for gate in ("snr", "hard"):
        case = Case(gate=gate, sizes=(1000, 7, 300, 0), steps=4)
        err = run_case(case, "eager", DEVICE)
        assert passes(case, err), err


def test_every_batch_of_pieces_gets_the_grad_scale_and_adds_its_stats(monkeypatch):
    """With several batches in one step, each batch is unscaled by grad_scale, computed in float32
    (bf16 params too) and adds its gate sums to its params' rows: against the float64 reference
    (steps and stats), grads given scaled by 8."""
    monkeypatch.setattr(eager, "PIECE", 64)
    monkeypatch.setattr(eager, "BATCH", 256)
    gen = torch.Generator().manual_seed(2)
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 2.0**-7)):
        init = [torch.randn(n, generator=gen).to(dtype) for n in (1000, 7, 300)]
        params = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in init]
        hp = dict(DEFAULTS, lr=1e-2, alpha=0.5)
        opt = SNRAdamW(params, backend="eager", track_stats=True, **hp)
        refs, states = [t.clone() for t in init], [reference.new_state(t) for t in init]
        scale = torch.tensor(8.0, device=DEVICE)
        for _ in range(3):
            grads = [torch.randn(t.shape, generator=gen).to(dtype) for t in init]
            for p, g in zip(params, grads):
                p.grad = g.to(DEVICE) * scale
            opt.step(grad_scale=scale)
            out = [reference.reference_step(r, g.double(), st, **hp) for r, g, st in zip(refs, grads, states)]
            stats = opt.stats()
            assert abs(stats["mean_gate"] - torch.cat([o["q"].flatten() for o in out]).mean().item()) < 1e-5
            signal = sum(o["mhat"].square().sum().item() for o in out)  # unlike the update, scale-dependent
            assert abs(stats["signal"] - signal) < 1e-4 * signal
        for p, r in zip(params, refs):
            torch.testing.assert_close(p.detach().cpu().double(), r.double(), rtol=tol, atol=tol * 1e-2)


def test_large_grads_stay_finite_whichever_order_addcmul_multiplies_in(monkeypatch):
    """CUDA's _foreach_addcmul_ computes self + value * (t1 * t2), the square first (the CPU kernel
    multiplies the value in first): on an H200, |g| = 3e19 gave the eager backend v = inf and no
    update. In CUDA's order on the CPU, the eager step still matches the float64 reference."""

    def cuda_order(selves, t1, t2, value=1):
        for x, a, b in zip(selves, t1, t2):
            x.add_(a * b, alpha=value)

    monkeypatch.setattr(torch, "_foreach_addcmul_", cuda_order)
    gen = torch.Generator().manual_seed(5)
    theta = torch.randn(64, generator=gen)
    grads = [torch.randn(64, generator=gen).sign() * scale for scale in (3e19, 3e19, 1e19, 1.0)]
    hp = dict(lr=1e-2, betas=(0.9, 0.99), rho=0.99, eps=1e-8, weight_decay=0.1, gate="snr", alpha=1.0,
              softness=1.0, gate_eps=1e-16, warmup_steps=0, maximize=False)
    p, _, ref_theta = step_beside_reference(theta, grads, "eager", hp)
    torch.testing.assert_close(p.detach().cpu().double(), ref_theta, rtol=1e-5, atol=1e-6)


def test_bf16_states_are_updated_in_float32_and_rounded_once():
    """v and s kept in bfloat16: each step computes beta2*v + (1-beta2)*g^2 and rho*s + (1-rho)*(g-m)^2
    in float32 and rounds once on store; updated in their bf16 storage they would round after each
    op (within one bf16 rounding, which every tolerance allows: a mutmut survivor). Against the
    float64 closed form from the same stored states, rounded once."""
    gen = torch.Generator().manual_seed(11)
    n = 4096
    p = torch.nn.Parameter(torch.randn(n, generator=gen))
    opt = SNRAdamW([p], lr=1e-3, betas=(0.9, 0.99), rho=0.9, backend="eager", state_dtype=torch.bfloat16)
    p.grad = torch.randn(n, generator=gen)
    opt.step()
    state = opt.state[p]
    m0, v0, s0 = (state[k].double() for k in ("exp_avg", "exp_avg_sq", "exp_grad_var"))
    g = torch.randn(n, generator=gen)
    p.grad = g.clone()
    opt.step()
    g = g.double()
    for key, want in (("exp_avg_sq", 0.99 * v0 + 0.01 * g * g), ("exp_grad_var", 0.9 * s0 + 0.1 * (g - m0) ** 2)):
        differ = int((state[key] != want.to(torch.bfloat16)).sum())
        assert differ <= n // 1000, (key, differ)  # float32 vs float64 may part at a rounding boundary


def test_an_s_hat_past_float32_under_a_gate_weight_of_zero_leaves_the_step_finite():
    """rho near 0 and |g| = 3e19: s = (1 - rho)(g - m)^2 overflows float32 while v (times 1 - beta2)
    does not. With softness 0 the snr gate's s-hat term has weight 0, and 0 * inf must not make
    the gate NaN: the step matches the float64 reference, where nothing overflows. (rho = 0
    exactly would make s = 0 * inf = NaN from the next step on, in every float32 backend.)"""
    gen = torch.Generator().manual_seed(12)
    theta = torch.randn(64, generator=gen)
    grads = [torch.randn(64, generator=gen).sign() * 3e19 for _ in range(3)]
    hp = dict(lr=1e-2, betas=(0.9, 0.999), rho=1e-3, eps=1e-8, weight_decay=0.0, gate="snr", alpha=1.0,
              softness=0.0, gate_eps=1e-16, warmup_steps=0, maximize=False)
    p, opt, ref_theta = step_beside_reference(theta, grads, "eager", hp)
    assert torch.isinf(opt.state[p]["exp_grad_var"]).any()  # the case: s past float32's range
    torch.testing.assert_close(p.detach().cpu().double(), ref_theta, rtol=1e-5, atol=1e-6)


def test_float64_params_stats_are_summed_in_float64():
    """At t = 1 m-hat = g, so the stats' signal is sum(g^2): for float64 params to float64's
    precision (a float32 sum of 2^16 terms is off by about 1e-7)."""
    gen = torch.Generator().manual_seed(13)
    p = torch.nn.Parameter(torch.randn(1 << 16, generator=gen, dtype=torch.float64).to(DEVICE))
    g = torch.randn(1 << 16, generator=gen, dtype=torch.float64) * (1 + torch.rand(1 << 16, generator=gen,
                                                                                  dtype=torch.float64))
    opt = SNRAdamW([p], backend="eager", track_stats=True)
    p.grad = g.to(DEVICE)
    opt.step()
    assert opt.stats()["signal"] == pytest.approx(float((g * g).sum()), rel=1e-12)


def test_a_skip_decided_on_the_device_holds_for_every_batch_of_a_step(monkeypatch):
    """Compiled (or with a GPU's found_inf) the eager backend decides a skip on the device and
    stores none of the copies it stepped. With batches flushed in the middle of a step (BATCH
    made small here; in use it is 4M elements), every batch must get that decision, not only
    the last: a non-finite grad in the last param leaves the first two untouched too."""
    monkeypatch.setattr(eager, "BATCH", 64)  # 50 + 40 elements flush a batch; the 30 are the last
    torch._dynamo.reset()
    try:
        params = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in (50, 40, 30)]
        opt = SNRAdamW(params, backend="eager", max_grad_norm=1.0)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        compiled = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
        before = [p.detach().clone() for p in params]
        states = [{key: value.clone() for key, value in opt.state[p].items()} for p in params]
        for p in params:
            p.grad = torch.randn_like(p)
        params[2].grad[0] = float("inf")
        compiled()
        for p, old, state in zip(params, before, states):
            assert torch.equal(p.detach(), old)
            for key, value in state.items():
                assert torch.equal(opt.state[p][key], value), key
        params[2].grad[0] = 0.0
        compiled()  # a finite step after it moves every param
        assert all(not torch.equal(p.detach(), old) for p, old in zip(params, before))
    finally:
        torch._dynamo.reset()


def test_a_one_param_step_skipped_on_the_device_changes_nothing():
    """The device-decided skip of a bucket holding a single param (its step count too)."""
    torch._dynamo.reset()
    try:
        p = torch.nn.Parameter(torch.randn(8, device=DEVICE))
        opt = SNRAdamW([p], backend="eager", max_grad_norm=1.0)
        p.grad = torch.randn_like(p)
        opt.step()
        compiled = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
        before, state = p.detach().clone(), {key: value.clone() for key, value in opt.state[p].items()}
        p.grad = torch.randn_like(p)
        p.grad[0] = float("inf")
        compiled()
        assert torch.equal(p.detach(), before)
        assert all(torch.equal(opt.state[p][key], value) for key, value in state.items())
    finally:
        torch._dynamo.reset()
