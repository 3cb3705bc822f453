"""Property tests (hypothesis), in the spirit of PyTorch's test_optim.py matrix: every backend x
param dtype x state dtype x gate x maximize / weight decay / warmup / lr tensor / grad scale,
with generated hyperparameters and shapes (0-size, odd sizes, transposed, strided views,
channels_last), each checked against the float64 reference."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import BACKENDS, DEVICE, dtypes_served
from snr_triton import SNRAdamW, reference
from snr_triton.check import DTYPES
from snr_triton.reference import gate_q

HYPER = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 5e-2), "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
    "rho": st.floats(0.0, 0.999), "eps": st.floats(1e-10, 1e-6), "weight_decay": st.floats(0.0, 0.5),
    "gate": st.sampled_from(["snr", "soft", "hard", "none"]), "alpha": st.floats(0.05, 4.0),
    "softness": st.floats(0.0, 3.0), "gate_eps": st.floats(1e-20, 1e-12), "warmup_steps": st.integers(0, 2),
    "maximize": st.booleans(),
})
LAYOUTS = ["contiguous", "transposed", "strided", "channels_last"]
STEPS = 3


def make_param(layout: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """A param of about n elements in the given memory layout (values from `gen`)."""
    if layout == "transposed":
        return torch.randn(n, 3, generator=gen).t()
    if layout == "strided":
        return torch.randn(n, 6, generator=gen)[:, ::2]
    if layout == "channels_last":
        return torch.randn(2, 3, n, 1, generator=gen).contiguous(memory_format=torch.channels_last)
    return torch.randn(n, generator=gen)


@st.composite
def cases(draw):
    backend = draw(st.sampled_from(BACKENDS))
    dtype = draw(st.sampled_from(dtypes_served(backend)))
    state_dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))  # float64 params keep float64 states
    shapes = draw(st.lists(st.tuples(st.sampled_from(LAYOUTS), st.integers(0, 70)), min_size=1, max_size=3))
    return backend, dtype, state_dtype, shapes, draw(HYPER), draw(st.booleans()), draw(st.booleans())


@given(case=cases(), seed=st.integers(0, 2**16))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_configuration_matches_the_reference(case, seed):
    backend, dtype, state_dtype, shapes, hp, lr_tensor, grad_scale = case
    gen = torch.Generator().manual_seed(seed)
    pdt = DTYPES[dtype]
    params = [make_param(layout, n, gen).to(pdt) for layout, n in shapes]
    ours = [torch.nn.Parameter(p.clone(memory_format=torch.preserve_format).to(DEVICE)) for p in params]
    refs = [p.clone() for p in params]
    states = [reference.new_state(p) for p in refs]
    if lr_tensor:  # a float32 tensor, as torch's own; the reference steps with its exact value
        lr = torch.tensor(hp["lr"], device=DEVICE)
        hp = {**hp, "lr": lr.item()}
    else:
        lr = hp["lr"]
    opt = SNRAdamW(ours, backend=backend, state_dtype=state_dtype, **{**hp, "lr": lr})
    scale = torch.tensor(256.0, device=DEVICE) if grad_scale else None
    store = None if dtype == "fp64" else state_dtype
    for _ in range(STEPS):
        grads = [(torch.randn(p.shape, generator=gen) + 0.5).to(pdt) for p in params]
        for p, g in zip(ours, grads):
            p.grad = (g.to(DEVICE) * scale).to(pdt) if grad_scale else g.to(DEVICE)
        opt.step(grad_scale=scale, found_inf=torch.tensor(0.0, device=DEVICE) if grad_scale else None)
        outs = [reference.reference_step(r, g, s, **hp, state_dtype=store) for r, g, s in zip(refs, grads, states)]
    ulp = torch.finfo(pdt).eps
    for p, r, out in zip(ours, refs, outs):
        assert p.stride() == r.stride()  # the layout is kept
        if r.numel() == 0:
            continue
        diff = (p.detach().cpu().double() - r.double()).abs()
        # STEPS roundings of the compute dtype; where the hard gate sits on its boundary
        # (|m-hat^2 - alpha s-hat| within float32 rounding) float32 and float64 may differ
        if hp["gate"] == "hard":
            tie = (out["mhat"] ** 2 - hp["alpha"] * out["shat"]).abs() <= 1e-5 * out["mhat"] ** 2
            diff = diff[~tie]
        compute_ulp = torch.finfo(torch.float64 if dtype == "fp64" else torch.float32).eps
        tol = STEPS * max(ulp, compute_ulp) * r.double().abs().max() + 1e-12
        if state_dtype == torch.bfloat16 and dtype != "fp64":
            # float32 and float64 math may round a state to neighbouring bf16 values (2^-8
            # apart, relative); that moves an update of size ~lr by ~lr * 2^-8 per step
            tol = tol + STEPS * hp["lr"] * 2.0**-6
        assert diff.numel() == 0 or diff.max() <= tol, (diff.max(), tol)


@given(m=st.floats(-1e3, 1e3), s=st.floats(0, 1e6), gate=st.sampled_from(["snr", "soft", "hard", "none"]),
       alpha=st.floats(0, 10), lam=st.floats(0, 10))
def test_gate_is_in_unit_interval(m, s, gate, alpha, lam):
    q = gate_q(torch.tensor([m], dtype=torch.float64), torch.tensor([s], dtype=torch.float64), gate=gate,
               alpha=alpha, softness=lam, gate_eps=1e-16)
    assert 0.0 <= q.item() <= 1.0


# 0, or well within float32's range (a 1e-33 hyperparameter is 0 or 1 - 0 = 1 to a float32 kernel)
COEFFICIENT = st.one_of(st.just(0.0), st.floats(1e-3, 4.0))


@given(seed=st.integers(0, 2**16), gate=st.sampled_from(["snr", "soft", "hard"]),
       backend=st.sampled_from(BACKENDS), alpha=COEFFICIENT, softness=COEFFICIENT,
       # beta1 = 0, or not so small that float32's 1 - (1 - beta1) is off by more than 1e-6 relative
       betas=st.tuples(st.one_of(st.just(0.0), st.floats(0.05, 0.99)), st.floats(0.5, 0.9999)),
       rho=st.one_of(st.just(0.0), st.floats(1e-3, 0.999)))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_gate_matches_the_reference_across_float32s_exponent_range(seed, gate, backend, alpha, softness,
                                                                       betas, rho):
    """States written by hand with magnitudes from 1e-37 to 1e37 (m and g below 1e18, so that s
    stays finite in float32), one gated step at t = 2 from theta = 0, so that the param is the
    update itself: every backend's against the float64 reference, relative to its size. The
    kernels scale the gate (ALGORITHM.md, "Numerics"); this is where a scale that loses range
    would show. Elements within 1e-4 (relative; 1e-2 for soft, whose d = m-hat^2 - alpha*s-hat loses
    digits there) of the boundary m-hat^2 = alpha*s-hat are left out: there the hard gate, and the
    soft one with softness 0, jump from 0 to 1 and float32 rounding may land on either side (beta1 = rho = 0 and alpha = 1 put many elements there); so are those
    whose q is below 1e-30, which a float32 kernel holds as a subnormal with few digits."""
    gen = torch.Generator().manual_seed(seed)

    def log_uniform(lo, hi, signed):
        x = 10.0 ** (lo + (hi - lo) * torch.rand(64, generator=gen, dtype=torch.float64))
        return (x * torch.randn(64, generator=gen, dtype=torch.float64).sign() if signed else x).float()

    m, v, s, g = log_uniform(-37, 18, True), log_uniform(-37, 37, False), log_uniform(-37, 37, False), \
        log_uniform(-19, 18, True)
    hp = dict(lr=1e-2, betas=betas, rho=rho, eps=1e-8, weight_decay=0.1, gate=gate, alpha=alpha, softness=softness,
              gate_eps=1e-16, warmup_steps=0, maximize=False)
    p = torch.nn.Parameter(torch.zeros(64, device=DEVICE))
    opt = SNRAdamW([p], backend=backend, **hp)
    p.grad = torch.zeros(64, device=DEVICE)
    opt.step()  # creates the states
    with torch.no_grad():
        p.zero_()
        for key, value in (("exp_avg", m), ("exp_avg_sq", v), ("exp_grad_var", s)):
            opt.state[p][key].copy_(value.to(DEVICE))
    p.grad = g.to(DEVICE)
    opt.step()
    ref = torch.zeros(64)
    state = {"step": 1, "exp_avg": m.double(), "exp_avg_sq": v.double(), "exp_grad_var": s.double()}
    out = reference.reference_step(ref, g.double(), state, **hp)
    signal, noise = out["mhat"] ** 2, alpha * out["shat"]
    margin = 1e-2 if gate == "soft" else 1e-4  # soft's d = x - alpha*y carries ulp(x) / margin
    clear = ((signal - noise).abs() > margin * (signal + noise)) & (out["q"] > 1e-30)  # q below: subnormals
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.detach().cpu()[clear], ref[clear], rtol=2e-5, atol=1e-38)
