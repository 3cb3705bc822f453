"""pytest-benchmark microbenchmarks of one optimizer step (CPU), SNRAdamW beside torch AdamW.

Run: pip install ".[bench]" && pytest bench/ --benchmark-only
Ratios between rows of one group are the result; absolute times depend on the machine.
"""

import pytest
import torch

from snr_triton import SNRAdamW

pytest.importorskip("pytest_benchmark", reason="the bench extra: pip install '.[bench]'")
ROUNDS, WARMUP = 20, 2


def runs(benchmark) -> int:
    """Steps taken: the first, then the timed rounds (one call under --benchmark-disable)."""
    return 2 if benchmark.disabled else 1 + ROUNDS + WARMUP


def check_stepped(opt, params, before, steps):
    """What every benchmark asserts of its runs: each step counted, and every param finite and moved."""
    for p, b in zip(params, before):
        assert torch.isfinite(p).all()
        assert (p.detach() != b).all()
        assert float(opt.state[p]["step"]) == steps

IMPLS = {
    "AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True),
    "AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
    "SNRAdamW cpu": lambda ps: SNRAdamW(ps, backend="cpu"),
    "SNRAdamW cpu bf16 state": lambda ps: SNRAdamW(ps, backend="cpu", state_dtype=torch.bfloat16),
    "SNRAdamW eager": lambda ps: SNRAdamW(ps, backend="eager"),
}


@pytest.mark.parametrize("numel", [1 << 20, 16 << 20])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_step(benchmark, impl, numel):
    p = torch.nn.Parameter(torch.randn(numel))
    p.grad = torch.randn(numel) * 1e-3
    before = [p.detach().clone()]
    opt = IMPLS[impl]([p])
    opt.step()
    benchmark.group = f"one step, {numel >> 20}M fp32 params"
    benchmark.pedantic(opt.step, rounds=ROUNDS, warmup_rounds=WARMUP)
    check_stepped(opt, [p], before, runs(benchmark))


@pytest.mark.parametrize("impl", ["AdamW fused", "SNRAdamW cpu"])
def test_host_overhead_1000_tensors(benchmark, impl):
    ps = [torch.nn.Parameter(torch.randn(8)) for _ in range(1000)]
    for p in ps:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in ps]
    opt = IMPLS[impl](ps)
    opt.step()
    benchmark.group = "host overhead, 1000 tensors of 8"
    benchmark.pedantic(opt.step, rounds=ROUNDS, warmup_rounds=WARMUP)
    check_stepped(opt, ps, before, runs(benchmark))
