"""What changes between steps: a group's state_dtype, the order or number of groups, a param
moved to another dtype. States migrate exactly (checked against an optimizer that got the same
states through load_state_dict), never stale buffers or silently ignored settings."""

import copy

import pytest
import torch

from conftest import BACKENDS, DEVICE
from snr_triton import SNRAdamW

HP = dict(lr=1e-2, alpha=0.7)


def stream(shapes, steps, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in shapes] for _ in range(steps)]


def params_of(shapes, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(DEVICE)) for s in shapes]


def train(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone().to(p.dtype)
        opt.step()


def twin_from(opt, params, **kw):
    """A fresh optimizer over copies of `params` that receives opt's states by load_state_dict."""
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    copy_of = {id(p): c for p, c in zip(params, copies)}
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [copy_of[id(p)] for p in g["params"]]} for g in opt.param_groups]
    for g in groups:
        g.update(kw)
    twin = SNRAdamW(groups)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    return twin, copies


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("before,after", [(torch.float32, torch.bfloat16), (torch.float32, torch.uint8),
                                          (torch.uint8, torch.float32)], ids=["to_bf16", "to_8bit", "from_8bit"])
def test_changing_state_dtype_between_steps_migrates_the_states(backend, before, after):
    """A group's state_dtype edited between steps: the states move over as a checkpoint would
    load them (rounded, encoded or decoded), against a twin loaded from a state dict."""
    shapes = [(300,), (3, 7)]
    params = params_of(shapes)
    grads = stream(shapes, 6)
    opt = SNRAdamW(params, backend=backend, state_dtype=before, **HP)
    train(opt, params, grads[:3])
    twin, copies = twin_from(opt, params, state_dtype=after)
    opt.param_groups[0]["state_dtype"] = after
    train(opt, params, grads[3:])
    train(twin, copies, grads[3:])
    for p, c in zip(params, copies):
        keys = ["step"] + [k + ("_codes" if after == torch.uint8 else "") for k in
                           ("exp_avg", "exp_avg_sq", "exp_grad_var")]
        assert opt.state[p][keys[1]].dtype == after
        assert torch.equal(p, c)
        for key in keys:
            assert torch.equal(opt.state[p][key], twin.state[c][key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_reordering_and_adding_groups_between_steps(backend):
    shapes = [(9,), (4, 3), (5,)]
    params = params_of(shapes)
    straight = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = stream(shapes, 6)
    ref = SNRAdamW([{"params": straight[:1], "gate": "soft"}, {"params": straight[1:2], "lr": 5e-3}],
                   backend=backend, **HP)
    opt = SNRAdamW([{"params": params[:1], "gate": "soft"}, {"params": params[1:2], "lr": 5e-3}],
                   backend=backend, **HP)
    train(ref, straight[:2], grads[:3])
    train(opt, params[:2], grads[:3])
    opt.param_groups.reverse()  # the same groups, other indices
    opt.add_param_group({"params": params[2:], "gate": "hard"})
    ref.add_param_group({"params": straight[2:], "gate": "hard"})
    train(opt, params, grads[3:])
    train(ref, straight, grads[3:])
    for p, r in zip(params, straight):
        assert torch.equal(p, r)
        assert opt.state[p]["step"].item() == ref.state[r]["step"].item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_moved_to_another_dtype_keeps_its_states(backend):
    shapes = [(40,), (6,)]
    params = params_of(shapes)
    grads = stream(shapes, 5)
    opt = SNRAdamW(params, backend=backend, **HP)
    train(opt, params, grads[:2])
    params[0].data = params[0].data.to(torch.bfloat16)  # e.g. a model cast after warm-up
    twin, copies = twin_from(opt, params)
    train(opt, params, grads[2:])
    train(twin, copies, grads[2:])
    for p, c in zip(params, copies):
        assert p.dtype == c.dtype and torch.equal(p, c)
        for key in ("exp_avg", "exp_avg_sq", "exp_grad_var", "step"):
            assert torch.equal(opt.state[p][key], twin.state[c][key]), key
    assert opt.state[params[0]]["step"].item() == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reset_params_old_states_are_freed(backend):
    """`del opt.state[p]` then a step makes fresh states; the old ones must not stay referenced
    by the bucket (mutmut: a release that kept the slot passed every test)."""
    import gc
    import weakref

    p = torch.nn.Parameter(torch.randn(10, device=DEVICE))
    opt = SNRAdamW([p], backend=backend)
    p.grad = torch.randn(10, device=DEVICE)
    opt.step()
    old = weakref.ref(opt.state[p]["exp_avg"])
    del opt.state[p]
    opt.step()
    gc.collect()
    assert old() is None
    assert float(opt.state[p]["step"]) == 1  # fresh
