"""Float64 reference of ALGORITHM.md, one tensor at a time.

Deliberately naive, so it can be checked line by line against the spec: it is
the ground truth that every backend is tested against. Not for training.
"""

from __future__ import annotations

import torch

from .codebook import BLOCK, table


def new_state(param: torch.Tensor) -> dict:
    zeros = torch.zeros(param.shape, dtype=torch.float64, device=param.device)
    return {"step": 0, "exp_avg": zeros.clone(), "exp_avg_sq": zeros.clone(), "exp_grad_var": zeros.clone()}


def gate_q(mhat: torch.Tensor, shat: torch.Tensor, *, gate: str, alpha: float, softness: float,
           gate_eps: float) -> torch.Tensor:
    """The mask q in [0, 1] for each element (ALGORITHM.md, table 'Gates')."""
    signal = mhat * mhat
    if gate == "snr":
        return signal / (signal + softness * alpha * shat + gate_eps)
    if gate == "soft":
        d = torch.clamp(signal - alpha * shat, min=0.0)
        return d / (d + softness * shat + gate_eps)
    if gate == "hard":
        return (signal > alpha * shat).to(torch.float64)
    if gate == "none":
        return torch.ones_like(signal)
    raise ValueError(f"unknown gate {gate!r}")


def reference_step(param: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float,
                   betas: tuple[float, float], rho: float, eps: float, weight_decay: float,
                   gate: str, alpha: float, softness: float, gate_eps: float, warmup_steps: int,
                   maximize: bool, grad_scale: float | None = None, found_inf: float | None = None,
                   state_dtype: torch.dtype | None = None) -> dict:
    """One step in float64; `param` is updated in place in its own dtype.

    `state_dtype`, when given, rounds the states through that dtype after the
    step, to model a backend that stores them narrower; torch.uint8 encodes them
    as 8-bit states (`encode_8bit`; the state then also holds the codes and
    scales under `exp_avg_codes`, `exp_avg_scales`, ...). Returns the per-element
    quantities of the step (mhat, shat, q) for tests of the monitor.
    """
    if found_inf:
        return {}
    beta1, beta2 = betas
    lr = float(lr)
    g = grad.to(torch.float64)
    if grad_scale is not None:
        g = g / float(grad_scale)
    if maximize:
        g = -g
    theta = param.to(torch.float64)
    m, v, s = state["exp_avg"], state["exp_avg_sq"], state["exp_grad_var"]

    t = state["step"] + 1
    s = rho * s + (1 - rho) * (g - m) ** 2  # m before this step's update
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    mhat = m / (1 - beta1**t)
    vhat = v / (1 - beta2**t)
    shat = s / (1 - rho**t)
    if t == 1:  # ALGORITHM.md: the first step is a tie by construction; the gate uses s-hat := m-hat^2
        shat = mhat * mhat
    if t <= warmup_steps:
        q = torch.ones_like(mhat)
    else:
        q = gate_q(mhat, shat, gate=gate, alpha=alpha, softness=softness, gate_eps=gate_eps)
    theta = theta * (1 - lr * weight_decay)
    theta = theta - lr * q * mhat / (torch.sqrt(vhat) + eps)

    if state_dtype == torch.uint8:
        coded = {}
        for key, x, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False), ("exp_grad_var", s, False)):
            coded[key + "_codes"], coded[key + "_scales"], coded[key] = encode_8bit(x, signed)
        m, v, s = coded["exp_avg"], coded["exp_avg_sq"], coded["exp_grad_var"]
        state.update(coded)
    elif state_dtype is not None:
        m, v, s = (x.to(state_dtype).to(torch.float64) for x in (m, v, s))
    state.update(step=t, exp_avg=m, exp_avg_sq=v, exp_grad_var=s)
    param.copy_(theta.to(param.dtype))
    return {"mhat": mhat, "shat": shat, "q": q}


def encode_8bit(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ALGORITHM.md '8-bit states' for float64 values in row-major blocks: (codes, float32 scales,
    the decoded float64 values). The nearest table entry by brute force (every distance), ties to
    the lower code: independent of the backends' threshold search."""
    q = table(signed, x.device).double()
    flat = x.reshape(-1)
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    scales = torch.empty(-(-n // BLOCK), dtype=torch.float32, device=x.device)
    for b, start in enumerate(range(0, n, BLOCK)):
        part = flat[start:start + BLOCK]
        scale = part.abs().max().float()  # stored as float32
        scales[b] = scale
        if scale == 0:
            codes[start:start + BLOCK] = int((q == 0).nonzero()[0])
            continue
        y = part / scale.double()
        codes[start:start + BLOCK] = (y[:, None] - q[None, :]).abs().argmin(1).to(torch.uint8)  # first minimum
    decoded = q[codes.long()] * scales.double().repeat_interleave(BLOCK)[:n]
    return codes.reshape(x.shape), scales, decoded.reshape(x.shape)


def exp_grad_var_from_adam(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: float,
                           betas: tuple[float, float], rho: float) -> torch.Tensor:
    """ALGORITHM.md 'Loading an AdamW checkpoint': s with s-hat = max(v-hat - m-hat^2, 0)."""
    beta1, beta2 = betas
    m, v = exp_avg.to(torch.float64), exp_avg_sq.to(torch.float64)
    if step == 0:
        return torch.zeros_like(m)
    mhat = m / (1 - beta1**step)
    vhat = v / (1 - beta2**step)
    return torch.clamp(vhat - mhat * mhat, min=0.0) * (1 - rho**step)
