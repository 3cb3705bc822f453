"""What only the eager backend has: bounded temporaries for large tensors."""

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
