"""The float64 reference against closed forms and torch.optim.AdamW: the truth is checked too."""

import pytest
import torch

from snr_triton import reference
from snr_triton.hyperparams import DEFAULTS


def one_step(gate, *, alpha=1.0, warmup=0, lr=0.1, wd=0.0, g=None, p=None):
    p = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) if p is None else p
    g = torch.tensor([0.3, -0.2, 1e-3], dtype=torch.float64) if g is None else g
    st = reference.new_state(p)
    q = reference.reference_step(p, g, st, **dict(DEFAULTS, gate=gate, alpha=alpha, lr=lr,
                                                   weight_decay=wd, warmup_steps=warmup))["q"]
    return p, g, st, q


def test_first_step_closed_form_none():
    # t = 1: m-hat = g, v-hat = g^2, so theta -= lr * g / (|g| + eps) after decay
    p0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    p, g, st, _ = one_step("none", wd=0.1)
    expected = p0 * (1 - 0.1 * 0.1) - 0.1 * g / (g.abs() + 1e-8)
    torch.testing.assert_close(p, expected, rtol=1e-14, atol=0)
    assert st["step"] == 1


def test_first_step_snr_gate_is_one_half():
    # t = 1: s-hat = g^2 = m-hat^2, so with alpha = softness = 1 the gate is 1/2 (ALGORITHM.md)
    _, g, st, q = one_step("snr")
    torch.testing.assert_close(q, g * g / (2 * g * g + 1e-16), rtol=1e-14, atol=0)
    torch.testing.assert_close(q[:2], torch.full_like(q[:2], 0.5), rtol=1e-14, atol=0)
    torch.testing.assert_close(st["exp_grad_var"], 0.01 * g * g, rtol=1e-14, atol=0)


def test_first_step_soft_and_hard_gates():
    _, _, _, q = one_step("soft")  # d = max(g^2 - g^2, 0) = 0
    assert torch.all(q == 0)
    _, _, _, q = one_step("hard", alpha=0.5)  # g^2 > 0.5 g^2
    assert torch.all(q == 1)
    _, _, _, q = one_step("hard", alpha=2.0)
    assert torch.all(q == 0)
    _, g, _, q = one_step("soft", alpha=0.5)  # d = g^2/2; q = d / (d + g^2 + delta) ~ 1/3
    torch.testing.assert_close(q, (g * g / 2) / (1.5 * g * g + 1e-16), rtol=1e-14, atol=0)
    torch.testing.assert_close(q[:2], torch.full_like(q[:2], 1 / 3), rtol=1e-14, atol=0)


def test_warmup_opens_the_gate():
    _, _, _, q = one_step("hard", alpha=2.0, warmup=1)
    assert torch.all(q == 1)


def test_exp_grad_var_uses_exp_avg_before_update():
    p = torch.zeros(1, dtype=torch.float64)
    st = reference.new_state(p)
    hp = dict(DEFAULTS, lr=0.0)
    reference.reference_step(p, torch.tensor([2.0], dtype=torch.float64), st, **hp)
    reference.reference_step(p, torch.tensor([-1.0], dtype=torch.float64), st, **hp)
    m1 = 0.1 * 2.0
    s2 = 0.99 * (0.01 * 4.0) + 0.01 * (-1.0 - m1) ** 2
    assert st["exp_grad_var"].item() == pytest.approx(s2, rel=1e-14)


def test_found_inf_is_a_no_op():
    p = torch.ones(3, dtype=torch.float64)
    st = reference.new_state(p)
    reference.reference_step(p, torch.ones(3, dtype=torch.float64), st, **DEFAULTS, found_inf=1.0)
    assert st["step"] == 0 and torch.all(p == 1) and torch.all(st["exp_avg"] == 0)


@pytest.mark.parametrize("maximize", [False, True])
def test_gate_none_is_torch_adamw_float64(maximize):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(50, generator=gen, dtype=torch.float64)
    torch_p = torch.nn.Parameter(w.clone())
    adamw = torch.optim.AdamW([torch_p], lr=1e-2, weight_decay=0.1, maximize=maximize)
    ref_p = w.clone()
    st = reference.new_state(ref_p)
    for _ in range(30):
        g = torch.randn(50, generator=gen, dtype=torch.float64)
        torch_p.grad = g.clone()
        adamw.step()
        reference.reference_step(ref_p, g, st, **dict(DEFAULTS, gate="none", lr=1e-2, weight_decay=0.1,
                                                      maximize=maximize))
    torch.testing.assert_close(ref_p, torch_p.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(st["exp_avg_sq"], adamw.state[torch_p]["exp_avg_sq"], rtol=1e-12, atol=0)


def test_adam_state_to_exp_grad_var():
    m = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
    v = torch.tensor([0.5, 0.3, 0.001], dtype=torch.float64)
    t, betas, rho = 10, (0.9, 0.999), 0.99
    s = reference.exp_grad_var_from_adam(m, v, t, betas, rho)
    mhat, vhat = m / (1 - 0.9**t), v / (1 - 0.999**t)
    shat = s / (1 - rho**t)
    torch.testing.assert_close(shat, torch.clamp(vhat - mhat**2, min=0), rtol=1e-14, atol=0)
    assert shat[2] == 0 and shat[0] > 0  # v-hat < m-hat^2 clamps to zero
