"""What only the eager backend has: bounded temporaries for large tensors."""

import torch

from conftest import DEVICE
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
