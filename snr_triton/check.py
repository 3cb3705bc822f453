"""Run a backend against the float64 reference on a small random problem.

Shared by `snr-triton check` and the test suite, so the CLI reports exactly
what CI asserts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import reference
from .hyperparams import DEFAULTS
from .optimizer import SNRAdamW

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
# Each step stores the param once, and a backend computing in float32 may land one ulp away from
# the float64 reference: the param error allowed after n steps is n ulps, an ulp being at most
# finfo.eps relative to max |param|. With lr = 1e-2 a wrong formula moves params by ~1e-3.
ULP = {name: torch.finfo(dtype).eps for name, dtype in DTYPES.items()}


@dataclass
class Case:
    gate: str = "snr"
    dtype: str = "fp32"
    maximize: bool = False
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    steps: int = 10
    sizes: tuple = (7, 33, 0)
    seed: int = 0
    lr: float = 1e-2
    alpha: float = 0.7  # off 1: at t=1 m-hat^2 == s-hat exactly, a tie rounding decides
    state_dtype: torch.dtype = torch.float32
    extra: dict = field(default_factory=dict)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    x, ref = x.double(), ref.double()
    scale = ref.abs().max().item()
    return (x - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def make_problem(case: Case, device="cpu"):
    """Params in two groups (the second with other hyperparameters) and a gradient stream
    with per-coordinate signal and noise, so the gate takes every value in [0, 1]."""
    gen = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    params = [torch.randn(n, generator=gen).to(dtype).to(device) for n in case.sizes]
    params.append(torch.randn(3, 5, generator=gen).to(dtype).to(device))
    signal = [torch.randn(p.shape, generator=gen) * torch.rand(p.shape, generator=gen) for p in params]
    grads = [[(s + torch.randn(s.shape, generator=gen)).to(dtype).to(device) for s in signal]
             for _ in range(case.steps)]
    return params, grads


def hyper(case: Case) -> tuple[dict, dict]:
    g0 = dict(DEFAULTS, lr=case.lr, gate=case.gate, maximize=case.maximize,
              weight_decay=case.weight_decay, warmup_steps=case.warmup_steps, alpha=case.alpha)
    g0.update(case.extra)
    g1 = dict(g0, lr=case.lr / 2, betas=(0.8, 0.99), rho=0.9, softness=0.5, alpha=case.alpha * 2,
              weight_decay=case.weight_decay * 3)
    return g0, g1


def simulate(case: Case, backend: str, device="cpu", model_state_rounding: bool = True):
    """Run SNRAdamW and the float64 reference side by side on the case's problem.

    Returns (initial params, our params, the optimizer, reference params, reference states).
    With `model_state_rounding` the reference rounds its states through case.state_dtype, as a
    backend storing them narrower does; without, it keeps them in float64 (the ideal).
    """
    params, grads = make_problem(case, device)
    g0, g1 = hyper(case)
    split = len(params) - 1
    ours = [p.clone() for p in params]
    opt = SNRAdamW([{"params": ours[:split], **g0}, {"params": ours[split:], **g1}],
                   backend=backend, state_dtype=case.state_dtype)
    refs = [p.clone() for p in params]
    ref_states = [reference.new_state(p) for p in refs]
    store = case.state_dtype if model_state_rounding and case.dtype != "fp64" else None
    for gs in grads:
        for p, g in zip(ours, gs):
            p.grad = g.clone()
        opt.step()
        for i, (p, g) in enumerate(zip(refs, gs)):
            reference.reference_step(p, g, ref_states[i], **(g0 if i < split else g1), state_dtype=store)
    return params, ours, opt, refs, ref_states


def ulps_per_step(p: torch.Tensor, r: torch.Tensor, steps: int, lr: float) -> float:
    """Max over elements of |p - r| in ulps of the element's own value (at least of lr, the
    update's scale), per step: a backend that moves a bf16 param less than the reference (or
    not at all) cannot hide behind the ulp of the largest element."""
    if r.numel() == 0:
        return 0.0
    finfo = torch.finfo(p.dtype)
    ulp = r.double().abs().clamp_min(lr) * finfo.eps
    return ((p.double() - r.double()).abs() / ulp).max().item() / max(steps, 1)


def run_case(case: Case, backend: str, device="cpu") -> dict[str, float]:
    """Errors after case.steps against the reference: params relative to max |param|, in ulps of
    each element's own value per step, and their displacement (theta_t - theta_0) norm-wise;
    states relative to their max."""
    return errors(case, *simulate(case, backend, device))


def errors(case: Case, params, ours, opt, refs, ref_states) -> dict[str, float]:
    """run_case's errors from simulate's results (also for results a test made up)."""
    err = {"param": 0.0, "param_ulps": 0.0, "displacement": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0,
           "exp_grad_var": 0.0, "step": 0.0}
    moved = sum(((r.double() - p0.double()).norm() ** 2).item() for r, p0 in zip(refs, params)) ** 0.5
    off = sum(((p.double() - r.double()).norm() ** 2).item() for p, r in zip(ours, refs)) ** 0.5
    err["displacement"] = off / moved if moved > 0 else off
    for p, r, st in zip(ours, refs, ref_states):
        err["param"] = max(err["param"], relative_error(p, r))
        if case.dtype in ("bf16", "fp16"):  # fp32/fp64: steps x eps of max |param| is already tight
            err["param_ulps"] = max(err["param_ulps"], ulps_per_step(p, r, case.steps, case.lr))
        for key in ("exp_avg", "exp_avg_sq", "exp_grad_var"):
            err[key] = max(err[key], relative_error(opt.state[p][key], st[key]))
        err["step"] = max(err["step"], abs(opt.state[p]["step"].item() - st["step"]))
    return err


def displacement_error(case: Case, backend: str, device="cpu") -> float:
    """Relative error of the params' displacement (theta_t - theta_0) against the reference that
    keeps its states in float64: what storing states narrower costs."""
    params, ours, _, refs, _ = simulate(case, backend, device, model_state_rounding=False)
    return max(relative_error(p - p0, r - p0) for p, r, p0 in zip(ours, refs, params))


def tolerances(case: Case) -> tuple[float, float]:
    """(params, states): n ulps of the param dtype; states are stored, not accumulated, so a few
    roundings of their own dtype."""
    param = case.steps * ULP[case.dtype]
    if case.dtype == "fp64":
        return param, 1e-13
    return param, 1e-5 if case.state_dtype == torch.float32 else 4 * 2.0**-8


# A backend may land one ulp of an element's own value away from the reference at each store;
# the displacement it makes over the steps must be the reference's to 1% (norm-wise): one that
# moves the params half as far, or not at all, scores 0.5 or 1.
ULPS_PER_STEP = 1.0
DISPLACEMENT_TOL = 1e-2


def passes(case: Case, err: dict[str, float]) -> bool:
    param_tol, state_tol = tolerances(case)
    states = max(err["exp_avg"], err["exp_avg_sq"], err["exp_grad_var"])
    return err["param"] <= param_tol and err["param_ulps"] <= ULPS_PER_STEP \
        and err["displacement"] <= DISPLACEMENT_TOL and states <= state_tol and err["step"] == 0

