"""What only the Triton backend has: one launch per bucket, address tables, compile, refusals.

On a CPU these run under TRITON_INTERPRET=1 (conftest.py); on a GPU, compiled.
"""

import copy

import pytest
import torch

from conftest import DEVICE, TRITON
from snr_triton import SNRAdamW, reference
from snr_triton.check import Case, hyper, make_problem, passes, run_case
from snr_triton.hyperparams import DEFAULTS

pytestmark = pytest.mark.skipif(not TRITON, reason="Triton is not installed")


@pytest.fixture
def launches(monkeypatch):
    """Counts real kernel launches by wrapping the kernel object itself."""
    from snr_triton.backend.triton import kernel_module

    km = kernel_module()
    real, grids = km.snr_adamw_kernel, []

    class Counting:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(km, "snr_adamw_kernel", Counting())
    return grids


def test_one_launch_per_bucket_for_100_tensors(launches):
    params = [torch.nn.Parameter(torch.randn(n % 13 + 1, device=DEVICE)) for n in range(100)]
    opt = SNRAdamW(params, backend="triton")
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        assert len(launches) == step + 1
    # a group of its own, or another dtype, is another bucket: one more launch each
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(5, device=DEVICE))], "lr": 1e-2})
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(5, device=DEVICE, dtype=torch.bfloat16))]})
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    launches.clear()
    opt.step()
    assert len(launches) == 3


def test_large_odd_size_against_reference():
    case = Case(sizes=(65537, 1, 0), steps=3)
    err = run_case(case, "triton", DEVICE)
    assert passes(case, err), err


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_triton_agrees_with_eager(dtype):
    case = Case(dtype=dtype, gate="soft", sizes=(300, 1), steps=6)
    params = {}
    for backend in ("triton", "eager"):
        ps, grads = make_problem(case, DEVICE)
        g0, g1 = hyper(case)
        opt = SNRAdamW([{"params": ps[:-1], **g0}, {"params": ps[-1:], **g1}], backend=backend)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g
            opt.step()
        params[backend] = (ps, [opt.state[p]["exp_grad_var"] for p in ps])
    # one ulp of each element's own value per step (issue 24: relative to max |param| a bf16
    # backend that never moved its params passed), and the same displacement to 1%
    from snr_triton.check import ulps_per_step

    start, _ = make_problem(case, DEVICE)
    for a, b, a0 in zip(params["triton"][0], params["eager"][0], start):
        assert ulps_per_step(a, b, case.steps, case.lr) <= 1.0
        moved = (b.double() - a0.double()).norm()
        assert (a.double() - b.double()).norm() <= 1e-2 * moved + 1e-12
    for a, b in zip(params["triton"][1], params["eager"][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_tables_follow_moved_storages():
    """New grad tensors every step (zero_grad(set_to_none=True)) and a param given new storage."""
    w = torch.nn.Parameter(torch.randn(40, device=DEVICE))
    ref = w.detach().clone().double()
    st = reference.new_state(ref)
    opt = SNRAdamW([w], lr=1e-2, alpha=0.5, backend="triton")
    gen = torch.Generator().manual_seed(0)
    keep = []
    for k in range(6):
        g = torch.randn(40, generator=gen).to(DEVICE)
        keep.append(torch.empty(1000, device=DEVICE))  # perturb the allocator between steps
        w.grad = g.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        reference.reference_step(ref, g.double(), st, **dict(DEFAULTS, lr=1e-2, alpha=0.5))
        if k == 2:
            w.data = w.data.clone()  # new storage, same values
    assert ((w.double() - ref).abs().max() / ref.abs().max()) <= 6 * torch.finfo(torch.float32).eps


def _trained_pair(backend="triton"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(DEVICE)
    twin = copy.deepcopy(model)
    opts = [SNRAdamW(m.parameters(), lr=torch.tensor(1e-2, device=DEVICE), alpha=0.5, backend=backend)
            for m in (model, twin)]
    x = torch.randn(8, 6, device=DEVICE)
    return model, twin, opts, x


def _backward(model, x):
    model.zero_grad()
    model(x).pow(2).mean().backward()


def test_step_reads_nothing_back_from_the_device(monkeypatch):
    """Capturable: with lr and step on the device, step() never calls item/cpu/tolist."""
    model, _, (opt, _), x = _trained_pair()
    _backward(model, x)
    opt.step()  # tables are built here, once

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronization inside step()")

    _backward(model, x)
    for name in ("item", "cpu", "tolist", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.step(grad_scale=torch.tensor(1.0, device=DEVICE), found_inf=torch.tensor(0.0, device=DEVICE))
    monkeypatch.undo()
    assert all(opt.state[p]["step"].item() == 2 for p in model.parameters())


def test_triton_refuses_float64_instead_of_falling_back():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="backend='triton'.*float64.*backend='eager' or 'auto'"):
        SNRAdamW([p], backend="triton")


def test_triton_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        SNRAdamW([torch.nn.Parameter(torch.ones(3))], backend="triton")
