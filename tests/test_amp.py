"""GradScaler on every backend: unscaling in the same pass, and an inf step that changes nothing."""

import copy

import pytest
import torch

from conftest import BACKENDS, DEVICE
from snr_triton import SNRAdamW, reference
from snr_triton.hyperparams import DEFAULTS


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_and_found_inf_arguments(backend):
    w = torch.nn.Parameter(torch.randn(50, device=DEVICE))
    opt = SNRAdamW([w], lr=1e-2, alpha=0.5, backend=backend, track_stats=True)
    ref = w.detach().clone().double()
    st = reference.new_state(ref)
    g = torch.randn(50, device=DEVICE)
    scale = torch.tensor(1024.0, device=DEVICE)
    w.grad = g * scale
    opt.step(grad_scale=scale, found_inf=torch.tensor(0.0, device=DEVICE))
    reference.reference_step(ref, g.double(), st, **dict(DEFAULTS, lr=1e-2, alpha=0.5))
    assert ((w.double() - ref).abs().max() / ref.abs().max()) <= torch.finfo(torch.float32).eps

    before_p, before_state = w.detach().clone(), copy.deepcopy(opt.state[w])
    # GradScaler passes the sum of its devices' found_inf: 2.0 when two devices found an inf
    for found in (1.0, 2.0):
        w.grad = torch.full_like(w, float("inf"))
        opt.step(grad_scale=scale, found_inf=torch.tensor(found, device=DEVICE))
        assert torch.equal(w.detach(), before_p)
        for key, value in before_state.items():
            assert torch.equal(opt.state[w][key], value), (found, key)
    assert opt.stats()["skipped_steps"] == 2  # each counted once, whatever found_inf's value


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
