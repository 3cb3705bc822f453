"""Triton-specific behaviour: one launch per bucket, address tables, GradScaler, rounding.

On a CPU these run under TRITON_INTERPRET=1 (conftest.py); on a GPU, compiled.
"""

import copy

import pytest
import torch

from conftest import BACKENDS, DEVICE, TRITON
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
    eps = torch.finfo(ps[0].dtype).eps
    for a, b in zip(params["triton"][0], params["eager"][0]):
        assert (a.double() - b.double()).abs().max() <= 6 * eps * b.double().abs().max()
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_and_found_inf_arguments(backend):
    w = torch.nn.Parameter(torch.randn(50, device=DEVICE))
    opt = SNRAdamW([w], lr=1e-2, alpha=0.5, backend=backend)
    ref = w.detach().clone().double()
    st = reference.new_state(ref)
    g = torch.randn(50, device=DEVICE)
    scale = torch.tensor(1024.0, device=DEVICE)
    w.grad = g * scale
    opt.step(grad_scale=scale, found_inf=torch.tensor(0.0, device=DEVICE))
    reference.reference_step(ref, g.double(), st, **dict(DEFAULTS, lr=1e-2, alpha=0.5))
    assert ((w.double() - ref).abs().max() / ref.abs().max()) <= torch.finfo(torch.float32).eps

    before_p, before_state = w.detach().clone(), copy.deepcopy(opt.state[w])
    w.grad = torch.full_like(w, float("inf"))
    opt.step(grad_scale=scale, found_inf=torch.tensor(1.0, device=DEVICE))
    assert torch.equal(w.detach(), before_p)
    for key, value in before_state.items():
        assert torch.equal(opt.state[w][key], value), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_torch_amp_grad_scaler(backend):
    """GradScaler hands grad_scale/found_inf to the optimizer; an inf skips the step entirely."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(DEVICE)
    twin = copy.deepcopy(model)
    opt = SNRAdamW(model.parameters(), lr=1e-2, alpha=0.5, backend=backend)
    twin_opt = SNRAdamW(twin.parameters(), lr=1e-2, alpha=0.5, backend="eager")
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**10)
    x = torch.randn(16, 8, device=DEVICE)
    for k in range(4):
        opt.zero_grad()
        twin_opt.zero_grad()
        loss = model(x).pow(2).mean()
        scaler.scale(loss).backward()
        if k == 2:  # planted overflow: this step must change nothing
            model.weight.grad[0, 0] = float("inf")
            state_before = copy.deepcopy(opt.state_dict())
            params_before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if k == 2:
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params_before))
            for i, st in state_before["state"].items():
                for key, value in st.items():
                    assert torch.equal(opt.state_dict()["state"][i][key], value)
            assert scaler.get_scale() == 2.0**9
            continue
        twin(x).pow(2).mean().backward()
        twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpu"])
def test_stochastic_rounding_is_unbiased(backend):
    """An update of 0.3 bf16 ulp: nearest rounding never moves, stochastic moves 30% of elements."""
    n, ulp = 8192, 2.0**-7  # bf16 spacing in [1, 2)
    results = {}
    for sr in (False, True):
        w = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device=DEVICE))
        opt = SNRAdamW([w], lr=0.3 * ulp, gate="none", weight_decay=0.0, backend=backend,
                       stochastic_rounding=sr)
        w.grad = -torch.ones_like(w)  # first Adam step: lr * g/(|g| + eps), so +0.3 ulp
        opt.step()
        results[sr] = (w.float() - 1.0) / ulp
    assert torch.all(results[False] == 0)
    frac_up = (results[True] == 1).float().mean().item()
    assert torch.all((results[True] == 0) | (results[True] == 1))
    assert abs(frac_up - 0.3) < 0.03  # 6 standard deviations of the mean at n = 8192


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


def test_torch_compile_sees_one_opaque_op_and_no_graph_break():
    model, twin, (opt, twin_opt), x = _trained_pair()
    for m, o in ((model, opt), (twin, twin_opt)):  # the first step creates the state eagerly
        _backward(m, x)
        o.step()
    _backward(model, x)
    explanation = torch._dynamo.explain(opt.step)()  # traces and runs one step
    assert explanation.graph_break_count == 0, explanation.break_reasons
    _backward(twin, x)
    twin_opt.step()
    torch._dynamo.reset()
    compiled_step = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    for _ in range(3):
        _backward(model, x)
        compiled_step()
        _backward(twin, x)
        twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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
