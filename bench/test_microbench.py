"""pytest-benchmark microbenchmarks of one optimizer step (CPU), SNRAdamW beside torch AdamW.

Run: pip install ".[bench]" && pytest bench/ --benchmark-only
Ratios between rows of one group are the result; absolute times depend on the machine.
"""

import pytest
import torch

from snr_triton import SNRAdamW

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
    opt = IMPLS[impl]([p])
    opt.step()
    benchmark.group = f"one step, {numel >> 20}M fp32 params"
    benchmark.pedantic(opt.step, rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("impl", ["AdamW fused", "SNRAdamW cpu"])
def test_host_overhead_1000_tensors(benchmark, impl):
    ps = [torch.nn.Parameter(torch.randn(8)) for _ in range(1000)]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = IMPLS[impl](ps)
    opt.step()
    benchmark.group = "host overhead, 1000 tensors of 8"
    benchmark.pedantic(opt.step, rounds=20, warmup_rounds=2)
