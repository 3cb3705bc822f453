"""Checkpoints are exact: save -> torch.save bytes -> load into a fresh optimizer -> continue is
bit-identical to the uninterrupted run, for every backend, param dtype, state dtype and gate.
States keep this optimizer's state_dtype (never the param's dtype), cross backends unchanged,
and cross state dtypes exactly (bf16 -> fp32) or rounded to nearest (fp32 -> bf16)."""

import io
import itertools

import pytest
import torch

from conftest import BACKENDS, DEVICE
from snr_triton import SNRAdamW
from snr_triton.backend import get
from snr_triton.hyperparams import DEFAULT_HYPER

PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STATE_DTYPES = [torch.float32, torch.bfloat16]
GATES = ["snr", "soft", "hard", "none"]
SHAPES = [(33,), (6, 5), (0,), (2, 3, 4)]
STEPS, CUT = 8, 4
SCALE = 1024.0


def serves(backend, dtype):
    return get(backend).unavailable_reason(torch.device(DEVICE), dtype, DEFAULT_HYPER) is None


CASES = [(b, d, s, g) for b, d, s, g in itertools.product(BACKENDS, PARAM_DTYPES, STATE_DTYPES, GATES)
         if serves(b, d)]


def options(gate, state_dtype, backend):
    """Each case varies the extras too, so every one of them meets every backend and dtype."""
    k = GATES.index(gate)
    lr = torch.tensor(1e-2, device=DEVICE) if k % 2 else 1e-2
    return dict(lr=lr, gate=gate, alpha=0.7, backend=backend, state_dtype=state_dtype,
                track_stats=k in (0, 3)), k >= 2  # the last two gates step through a grad scaler


def make(dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(DEVICE)) for s in SHAPES]


def grads(dtype):
    gen = torch.Generator().manual_seed(2)
    return [[torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in SHAPES] for _ in range(STEPS)]


def train(opt, params, stream, scaled, first_step):
    for k, gs in enumerate(stream, start=first_step):
        for p, g in zip(params, gs):
            p.grad = g * SCALE if scaled else g.clone()
        if scaled:  # an overflow at step 2: a no-op that must survive the checkpoint too
            inf = torch.tensor(float(k == 2), device=DEVICE)
            opt.step(grad_scale=torch.tensor(SCALE, device=DEVICE), found_inf=inf)
        else:
            opt.step()


def through_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("backend,dtype,state_dtype,gate", CASES)
def test_resume_is_bit_identical(backend, dtype, state_dtype, gate):
    kw, scaled = options(gate, state_dtype, backend)
    stream = grads(dtype)
    straight = make(dtype)
    opt = SNRAdamW(straight, **kw)
    train(opt, straight, stream, scaled, 0)

    first = make(dtype)
    opt1 = SNRAdamW(first, **kw)
    train(opt1, first, stream[:CUT], scaled, 0)
    saved = through_bytes({"params": [p.detach() for p in first], "opt": opt1.state_dict()})
    resumed = make(dtype, seed=99)
    with torch.no_grad():
        for p, s in zip(resumed, saved["params"]):
            p.copy_(s)
    opt2 = SNRAdamW(resumed, **kw)
    opt2.load_state_dict(saved["opt"])
    for p in resumed:
        for key in ("exp_avg", "exp_avg_sq", "exp_grad_var"):
            assert opt2.state[p][key].dtype in (state_dtype, torch.complex64)  # never the param's dtype
    train(opt2, resumed, stream[CUT:], scaled, CUT)

    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)
    for a, b in zip(opt2.state_dict()["state"].values(), opt.state_dict()["state"].values()):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    if kw["track_stats"]:
        assert opt2.stats() == opt.stats()


def _trained_state(backend, state_dtype, dtype=torch.float32):
    params = make(dtype)
    opt = SNRAdamW(params, lr=1e-2, alpha=0.7, backend=backend, state_dtype=state_dtype)
    train(opt, params, grads(dtype)[:3], False, 0)
    return params, through_bytes(opt.state_dict())


@pytest.mark.parametrize("saved_on,loaded_on", list(itertools.product(BACKENDS, BACKENDS)))
def test_checkpoints_cross_backends_unchanged(saved_on, loaded_on):
    params, sd = _trained_state(saved_on, torch.float32)
    opt = SNRAdamW(params, lr=1e-2, backend=loaded_on)
    opt.load_state_dict(sd)
    for i, p in enumerate(params):
        for key, value in sd["state"][i].items():
            assert torch.equal(opt.state[p][key], value.to(DEVICE)), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoints_cross_state_dtypes(backend):
    params, sd16 = _trained_state(backend, torch.bfloat16)
    opt = SNRAdamW(params, lr=1e-2, backend=backend, state_dtype=torch.float32)
    opt.load_state_dict(sd16)
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq", "exp_grad_var"):
            assert opt.state[p][key].dtype == torch.float32
            assert torch.equal(opt.state[p][key], sd16["state"][i][key].float())  # exact
    params, sd32 = _trained_state(backend, torch.float32)
    opt = SNRAdamW(params, lr=1e-2, backend=backend, state_dtype=torch.bfloat16)
    opt.load_state_dict(sd32)
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq", "exp_grad_var"):
            assert torch.equal(opt.state[p][key], sd32["state"][i][key].to(torch.bfloat16))  # nearest


def test_fp16_model_resumes_without_flushing_small_moments():
    """The bug this guards against: Optimizer.load_state_dict casts states to the param dtype,
    and fp16 flushes small exp_avg_sq to zero (then huge steps)."""
    params = make(torch.float16)
    opt = SNRAdamW(params, lr=1e-2, backend="eager")
    for p in params:
        p.grad = torch.full_like(p, 1e-5)
    opt.step()
    sd = through_bytes(opt.state_dict())
    tiny = sd["state"][0]["exp_avg_sq"]
    assert tiny.dtype == torch.float32 and 0 < tiny.abs().max() < 6e-8  # below fp16's smallest subnormal
    opt2 = SNRAdamW(params, lr=1e-2, backend="eager")
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.state[params[0]]["exp_avg_sq"], tiny)
