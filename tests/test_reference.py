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


# Two steps worked out by hand from ALGORITHM.md (issue 24: every closed form was at t = 1, where
# s-hat is replaced by m-hat^2, so dropping s's bias correction passed). beta1 = 0.9, beta2 = 0.999,
# rho = 0.99; grads (1, 1) on coordinate 0 (a steady signal), (1, -1) on coordinate 1 (noise),
# (2, 2) on coordinate 2 (coordinate 0 scaled: the gate is scale-invariant).
#   step 1: m = 0.1 g, v = 0.001 g^2, s = 0.01 g^2 (m was 0); m-hat = g, v-hat = g^2, s-hat := m-hat^2
#   step 2, coordinate 0: m = 0.09 + 0.1 = 0.19, v = 0.000999 + 0.001 = 0.001999,
#           s = 0.99 * 0.01 + 0.01 * (1 - 0.1)^2 = 0.018; bc1 = 0.19, bc2 = 0.001999, bc3 = 0.0199:
#           m-hat = 1, v-hat = 1, s-hat = 0.018 / 0.0199
#   step 2, coordinate 1: m = 0.09 - 0.1 = -0.01, v = 0.001999, s = 0.0099 + 0.01 * 1.1^2 = 0.022:
#           m-hat = -0.01 / 0.19, v-hat = 1, s-hat = 0.022 / 0.0199
SHAT = (0.018 / 0.0199, 0.022 / 0.0199, 4 * 0.018 / 0.0199)
MHAT = (1.0, -0.01 / 0.19, 2.0)
VHAT = (1.0, 1.0, 4.0)
LAM, LR, WD, EPS, DELTA = 0.5, 0.1, 0.1, 1e-8, 1e-16


def by_hand(gate, alpha):
    """theta after the two steps, for theta_0 = (1, -2, 0.5)."""
    def q(mhat, shat):
        a = mhat * mhat
        if gate == "snr":
            return a / (a + LAM * alpha * shat + DELTA)
        if gate == "soft":
            d = max(a - alpha * shat, 0.0)
            return d / (d + LAM * shat + DELTA)
        return 1.0 if a > alpha * shat else 0.0  # hard

    out = []
    for theta, g1, mhat, vhat, shat in zip((1.0, -2.0, 0.5), (1.0, 1.0, 2.0), MHAT, VHAT, SHAT):
        q1 = q(g1, g1 * g1)  # t = 1: s-hat := m-hat^2
        theta = theta * (1 - LR * WD) - LR * q1 * g1 / (abs(g1) + EPS)
        theta = theta * (1 - LR * WD) - LR * q(mhat, shat) * mhat / (vhat ** 0.5 + EPS)
        out.append(theta)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("gate,alpha", [("snr", 1.0), ("snr", 0.3), ("soft", 0.5), ("hard", 1.0), ("hard", 0.999)])
def test_two_steps_by_hand(gate, alpha):
    p = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    st = reference.new_state(p)
    hp = dict(DEFAULTS, gate=gate, alpha=alpha, softness=LAM, lr=LR, weight_decay=WD)
    for g in (torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, -1.0, 2.0])):
        reference.reference_step(p, g.double(), st, **hp)
    torch.testing.assert_close(p, by_hand(gate, alpha), rtol=1e-12, atol=0)
    shat = st["exp_grad_var"] / (1 - 0.99**2)
    torch.testing.assert_close(shat, torch.tensor(SHAT, dtype=torch.float64), rtol=1e-12, atol=0)


def test_a_closed_gate_still_decays_the_weight():
    """hard, alpha = 1: coordinate 1 (noise) has m-hat^2 = 0.0028 < s-hat = 1.1: q = 0 at step 2, so
    only the decoupled weight decay moves it (ALGORITHM.md: the decay is not gated)."""
    p = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    st = reference.new_state(p)
    hp = dict(DEFAULTS, gate="hard", alpha=1.0, softness=LAM, lr=LR, weight_decay=WD)
    reference.reference_step(p, torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64), st, **hp)
    after_one = p.clone()
    q = reference.reference_step(p, torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64), st, **hp)["q"]
    assert q.tolist() == [1.0, 0.0, 1.0]
    assert p[1].item() == pytest.approx(after_one[1].item() * (1 - LR * WD), rel=1e-15)
