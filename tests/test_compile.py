"""torch.compile on every backend: the step traces with no graph break (the fused kernels as
opaque custom ops, the eager path as foreach ops with no host reads), a compiled step equals the
uncompiled one, and a tensor lr changed by a schedule does not recompile."""

import copy
import logging

import pytest
import torch

from conftest import BACKENDS, DEVICE
from snr_triton import SNRAdamW


def pair(backend, gate="snr", state_dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(DEVICE)
    twin = copy.deepcopy(model)
    opts = [SNRAdamW(m.parameters(), lr=torch.tensor(1e-2, device=DEVICE), alpha=0.5, gate=gate, backend=backend,
                     track_stats=True, state_dtype=state_dtype) for m in (model, twin)]
    return (model, opts[0]), (twin, opts[1])


def backward(model, k):
    gen = torch.Generator().manual_seed(k)
    model.zero_grad()
    model(torch.randn(8, 6, generator=gen).to(DEVICE)).pow(2).mean().backward()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._logging.set_logs(dynamo=logging.ERROR)
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["snr", "none"])
def test_step_traces_without_graph_breaks(backend, gate):
    (model, opt), _ = pair(backend, gate)
    backward(model, 0)
    opt.step()  # the first step creates the state eagerly
    backward(model, 1)
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.op_count > 0  # traced, not skipped


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_equals_eager_and_lr_changes_do_not_recompile(backend):
    (model, opt), (twin, twin_opt) = pair(backend)
    for m, o in ((model, opt), (twin, twin_opt)):
        backward(m, 0)
        o.step()
    compiled = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    for k in range(1, 5):
        for o in (opt, twin_opt):  # a schedule that edits the tensor lr in place
            o.param_groups[0]["lr"].fill_(1e-2 / k)
        backward(model, k)
        compiled()
        backward(twin, k)
        twin_opt.step()
        if k == 1:
            torch.compiler.set_stance("fail_on_recompile")  # any recompile from here on raises
    torch.compiler.set_stance("default")
    # bit for bit on the CPU; on a GPU aot_eager's decompositions of the eager backend's foreach ops
    # run other CUDA kernels, which may round one element an ulp apart (1 of 30, 1.9e-9, on an H200)
    exact = DEVICE == "cpu" or backend != "eager"
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0 if exact else 2.4e-7, atol=0)
    assert opt.stats()["mean_gate"] == pytest.approx(twin_opt.stats()["mean_gate"], rel=0 if exact else 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_assigns_no_optimizer_attribute(backend, monkeypatch):
    """Dynamo in torch 2.11 crashes on `optimizer.attr = ...` inside a compiled function
    (pytorch/pytorch#171590; seen on an H200; torch 2.13 traces it): step() must only mutate state it
    already owns. Checked on the first step (state creation), a tracked step and a GradScaler step."""
    (model, opt), _ = pair(backend)
    assigned = []
    original = type(opt).__setattr__
    monkeypatch.setattr(type(opt), "__setattr__", lambda self, name, value: (assigned.append(name),
                                                                            original(self, name, value)))
    for k in range(3):
        backward(model, k)
        if k == 2:
            opt.step(grad_scale=torch.tensor(1.0, device=DEVICE), found_inf=torch.tensor(0.0, device=DEVICE))
        else:
            opt.step()
    monkeypatch.undo()
    assert assigned == []
    assert opt.stats()["mean_gate"] > 0  # the stats of the last step were kept all the same


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_step_skipped_on_the_device_counts_nothing_in_its_stats(backend):
    """Under torch.compile found_inf is decided on the device (no host read): a skipped step
    leaves params and step counts alone and its stats are an empty step's (mean_gate NaN, sums 0),
    as in eager mode (tests/test_monitor.py)."""
    import math

    (model, opt), _ = pair(backend)
    backward(model, 0)
    opt.step()
    compiled = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    backward(model, 1)
    before = [p.detach().clone() for p in model.parameters()]
    compiled(grad_scale=torch.tensor(1.0, device=DEVICE), found_inf=torch.tensor(1.0, device=DEVICE))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(opt.state[p]["step"].item() == 1 for p in model.parameters())
    stats = opt.stats()
    assert math.isnan(stats["mean_gate"]) and math.isnan(stats["frac_above"])
    assert stats["signal"] == 0 and stats["noise"] == 0


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.uint8], ids=["fp32_states", "8bit_states"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_steps_after_compiled_ones_equal_a_twin_stepped_eagerly(backend, state_dtype):
    """Compiled steps hand the kernel the states' addresses; an eager step after them (an eval
    loop's, a step outside the compiled function) must point the kernel back at the states' own:
    the same params as a twin that never compiled."""
    (model, opt), (twin, twin_opt) = pair(backend, state_dtype=state_dtype)
    compiled = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    for k in range(6):
        backward(model, k)
        backward(twin, k)
        if 1 <= k <= 3:
            compiled()
        else:  # eager before (the states made) and after the compiled steps
            opt.step()
        twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.uint8], ids=["fp32_states", "8bit_states"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
def test_the_step_op_steps_copies_of_the_states_it_is_handed(backend, state_dtype, monkeypatch):
    """Under torch.compile the custom op gets every tensor it writes as an argument, and a compiler
    may hand it copies of the states (functionalized, then copied back) while the params and
    grads stay where they were. Emulated here: the op called as under compile, with fresh copies
    of the states each step (the previous step's kept alive, so the addresses differ), copied back
    after, and the grads written in place (their addresses unchanged too). Every tensor the kernel
    writes must be among the op's arguments, and the kernel must step the copies it is handed:
    the same params and states as a twin stepped eagerly. (A block map keyed by the param and
    grad addresses alone stepped the previous step's copies.)"""
    import importlib

    module = importlib.import_module(f"snr_triton.backend.{backend}")
    (model, opt), (twin, twin_opt) = pair(backend, state_dtype=state_dtype)
    real_op, kept = module.fused_step_op, []

    arguments = []  # the addresses of the tensors the op was handed to write, per step

    def copying_op(params, grads, *rest):
        states, rest = rest[:6], rest[6:]
        arguments.append({t.data_ptr() for ts in states for t in ts})
        copies = [[t.clone() for t in ts] for ts in states]
        kept.append(copies)
        real_op(params, grads, *copies, *rest)
        for originals, handed in zip(states, copies):
            for original, copy_ in zip(originals, handed):
                original.copy_(copy_)

    gen = torch.Generator().manual_seed(0)
    for k in range(5):
        for a, b in zip(model.parameters(), twin.parameters()):  # grads written in place: same addresses
            g = torch.randn(a.shape, generator=gen).to(DEVICE)
            if k == 0:
                a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
            a.grad.copy_(g)
            b.grad.copy_(g)
        if k >= 1:  # the first step makes the states eagerly
            with monkeypatch.context() as patch:
                patch.setattr(module, "fused_step_op", copying_op)
                patch.setattr(torch.compiler, "is_compiling", lambda: True)
                opt.step()
        else:
            opt.step()
        twin_opt.step()
    assert len(kept) == 4 and len({t.data_ptr() for copies in kept for t in copies[0]}) == 4 * len(kept[0][0])
    # every tensor the kernel writes is an argument (what functionalization relies on): m, v, s, and
    # with 8-bit states their codes and scales
    slots = [opt._slots[p] for p in model.parameters()]
    written = {t.data_ptr() for slot in slots for t in (*slot.real, *(slot.scales or ()))}
    assert all(addresses == written for addresses in arguments)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
        assert all(torch.equal(x, y) for x, y in zip(opt.state[a].values(), twin_opt.state[b].values()))
