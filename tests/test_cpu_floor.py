"""bench/cpu_floor.py's floor passes do all the work they stand for: a pass that skipped elements
(a chunk's tail, a thread's share) would be a floor under nothing, and issue 20's verdict rests on it."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "cpu_floor.py"
spec = importlib.util.spec_from_file_location("cpu_floor", SCRIPT)
cpu_floor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu_floor)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return cpu_floor.streams_library(tmp_path_factory.mktemp("floor"))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("numel", [1, 31, 33, (1 << 15) + 1, 3 * (1 << 15) + 77])
def test_every_floor_pass_touches_every_element_as_it_says(lib, numel, threads):
    gen = torch.Generator().manual_seed(numel)
    fresh = [torch.rand(numel, generator=gen) + 0.5 for _ in range(5)]
    buffers = [b.clone() for b in fresh]
    p, g, m, v, s = fresh
    total = cpu_floor.run_streams(lib, "read", buffers, threads)
    assert total == pytest.approx(g.double().square().sum().item(), rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(buffers, fresh))  # read only
    cpu_floor.run_streams(lib, "scale", buffers, threads)
    g = g * 0.999
    assert torch.allclose(buffers[1], g, rtol=1e-6, atol=0)
    cpu_floor.run_streams(lib, "adamw", buffers, threads)
    p, m, v = p - 1e-9 * g, 0.9 * m + g, 0.99 * v + g * g
    for got, want in zip(buffers[:4], (p, g, m, v)):
        assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert torch.equal(buffers[4], s)  # AdamW has no third state
    cpu_floor.run_streams(lib, "snr", buffers, threads)
    p, m, v, s = p - 1e-9 * g, 0.9 * m + g, 0.99 * v + g * g, 0.99 * s + g * g
    for got, want in zip(buffers, (p, g, m, v, s)):
        assert torch.allclose(got, want, rtol=1e-6, atol=0)
