"""torch.optim's contract, the way PyTorch's own optimizer tests check it, on every backend and
gate: state_dict round trips are idempotent and deterministic (plain, named, deepcopy, pickle,
weights_only), named parameters, complex params with every state dtype, what AdamW accepts
(tensor lr shapes, tensor betas), a failing step changes nothing, hooks, zero-grad no-ops."""

import copy
import io
import pickle

import pytest
import torch

from conftest import BACKENDS, DEVICE, step_beside_reference
from snr_triton import SNRAdamW

GATES = ["snr", "soft", "hard", "none"]
MATRIX = [(b, g) for b in BACKENDS for g in GATES]


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)).to(DEVICE)


def backward(m, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m.zero_grad()
    m(torch.randn(7, 5, generator=gen).to(DEVICE)).pow(2).mean().backward()


def trained(backend, gate, named=False, steps=3):
    m = model()
    opt = SNRAdamW(m.named_parameters() if named else m.parameters(), lr=1e-2, gate=gate, alpha=0.7,
                   backend=backend)
    for k in range(steps):
        backward(m, k)
        opt.step()
    return m, opt


def assert_state_dicts_equal(a, b, groups=True):
    assert a["param_groups"] == b["param_groups"] or not groups
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for key, value in a["state"][k].items():
            assert torch.equal(value, b["state"][k][key]), (k, key)


def snapshot(m, opt):
    return [p.detach().clone() for p in m.parameters()], copy.deepcopy(opt.state_dict())


def assert_unchanged(m, opt, before, groups=True):
    params, sd = before
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), params))
    assert_state_dicts_equal(opt.state_dict(), sd, groups)


@pytest.mark.parametrize("backend,gate", MATRIX)
@pytest.mark.parametrize("named", [False, True])
def test_state_dict_round_trips_are_idempotent(backend, gate, named):
    m, opt = trained(backend, gate, named)
    sd = opt.state_dict()
    if named:
        assert sd["param_groups"][0]["param_names"][0] == "0.weight"
    fresh = SNRAdamW(model().named_parameters() if named else model().parameters(), gate=gate, backend=backend)
    fresh.load_state_dict(copy.deepcopy(sd))
    assert_state_dicts_equal(fresh.state_dict(), sd)
    assert_state_dicts_equal(copy.deepcopy(opt).state_dict(), sd)
    assert_state_dicts_equal(pickle.loads(pickle.dumps(opt)).state_dict(), sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    again = SNRAdamW(model().named_parameters() if named else model().parameters(), gate=gate, backend=backend)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert_state_dicts_equal(again.state_dict(), sd)
    # deterministic: loading twice, or loading its own state dict, changes nothing
    again.load_state_dict(again.state_dict())
    assert_state_dicts_equal(again.state_dict(), sd)


@pytest.mark.parametrize("backend,gate", MATRIX)
def test_named_parameters_step_like_plain_ones(backend, gate):
    (m1, _), (m2, _) = trained(backend, gate, named=False), trained(backend, gate, named=True)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_complex_params_step_their_real_view_with_every_state_dtype(backend, state_dtype):
    gen = torch.Generator().manual_seed(3)
    z0 = torch.randn(6, 2, generator=gen).to(DEVICE)
    z = torch.nn.Parameter(torch.view_as_complex(z0.clone()))
    r = torch.nn.Parameter(z0.clone())
    oz = SNRAdamW([z], lr=1e-2, backend=backend, state_dtype=state_dtype)
    orr = SNRAdamW([r], lr=1e-2, backend=backend, state_dtype=state_dtype)
    for _ in range(4):
        g = torch.randn(6, 2, generator=gen).to(DEVICE)
        z.grad, r.grad = torch.view_as_complex(g.clone()), g.clone()
        oz.step()
        orr.step()
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())
    m = oz.state[z]["exp_avg"]
    # torch has no bfloat16 complex dtype: bf16 states of a complex param are its real view
    assert m.is_complex() if state_dtype == torch.float32 else (m.dtype, m.shape) == (torch.bfloat16, (6, 2))
    assert torch.equal(torch.view_as_real(m) if m.is_complex() else m, orr.state[r]["exp_avg"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_group_mixing_dtypes_and_complex_params_steps_each_as_it_would_alone(backend):
    """One group's params in two buckets taken in turn (float32, bf16, complex64, float32, bf16):
    each bucket's params are gathered across the group, a plain param after a complex one in the
    same bucket is walked as itself, and per-param stats name each. The truth: each param stepped
    by an optimizer of its own (a complex one as its real view)."""
    gen = torch.Generator().manual_seed(4)
    spec = {"a": ((5,), torch.float32), "b": ((4,), torch.bfloat16), "c": ((3, 2), torch.complex64),
            "d": ((6,), torch.float32), "e": ((2,), torch.bfloat16)}
    init = {k: torch.randn(shape, generator=gen).to(DEVICE) for k, (shape, _) in spec.items()}

    def param(k, real=False):
        x = init[k].clone()
        dtype = spec[k][1]
        return torch.nn.Parameter(x if real else torch.view_as_complex(x) if dtype.is_complex else x.to(dtype))

    hp = dict(lr=1e-2, gate="snr", alpha=0.7, weight_decay=0.1, backend=backend, track_stats=True)
    ours = {k: param(k) for k in spec}
    opt = SNRAdamW(list(ours.items()), **hp)
    alone = {k: param(k, real=True) if spec[k][1].is_complex else param(k) for k in spec}
    solos = {k: SNRAdamW([(k, p)], **hp) for k, p in alone.items()}
    for _ in range(3):
        for k, (shape, dtype) in spec.items():
            g = torch.randn(shape, generator=gen).to(DEVICE)
            ours[k].grad = torch.view_as_complex(g.clone()) if dtype.is_complex else g.to(dtype)
            alone[k].grad = g.clone() if dtype.is_complex else g.to(dtype)
        opt.step()
        for solo in solos.values():
            solo.step()
        per_param = opt.stats(per_param=True)["params"]  # the first step's too: every param new then
        for k, p in ours.items():
            mine = torch.view_as_real(p.detach()) if p.is_complex() else p.detach()
            assert torch.equal(mine, alone[k].detach()), k
            want = solos[k].stats(per_param=True)["params"][k]
            assert per_param[k].keys() == want.keys()
            for key, value in want.items():
                assert per_param[k][key] == pytest.approx(value, rel=1e-6), (k, key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lr", [torch.tensor(3e-3), torch.tensor([3e-3])], ids=["0-dim", "shape-1"])
def test_tensor_lr_and_tensor_betas_as_adamw_takes_them(backend, lr):
    ref_model, ref = trained(backend, "snr")
    m = model()
    opt = SNRAdamW(m.parameters(), lr=lr.to(DEVICE) * (1e-2 / 3e-3), betas=(torch.tensor(0.9), torch.tensor(0.999)),
                   gate="snr", alpha=0.7, backend=backend)
    for k in range(3):
        backward(m, k)
        opt.step()
    for a, b in zip(m.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.optim.AdamW(model().parameters(), lr=lr, betas=(torch.tensor(0.9), torch.tensor(0.999)))  # as AdamW


@pytest.mark.parametrize("backend,gate", MATRIX)
def test_a_failing_step_changes_nothing(backend, gate):
    m, opt = trained(backend, gate)
    backward(m, 7)
    before = snapshot(m, opt)
    keys = set(opt.state)
    w = m[0].weight
    good = w.grad
    w.grad_dtype = None
    w.grad = good.double()  # a grad of another dtype: the kernels would misread it
    with pytest.raises(RuntimeError, match=r"grad does not match its param \(param 0 of param group 0\)"):
        opt.step()
    assert_unchanged(m, opt, before)
    assert set(opt.state) == keys
    w.grad = good
    opt.param_groups[0]["gate"] = "bogus"  # an invalid edit, caught before anything moves
    with pytest.raises(ValueError, match="gate must be one of"):
        opt.step()
    assert_unchanged(m, opt, before, groups=False)
    opt.param_groups[0]["gate"] = gate
    opt.step()  # and then it steps
    assert not torch.equal(w.detach(), before[0][0])


@pytest.mark.parametrize("backend,gate", MATRIX)
def test_hooks_run_in_order(backend, gate):
    m, opt = trained(backend, gate, steps=1)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd pre"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("sd post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load post"))
    backward(m)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert seen == ["pre", "post", "sd pre", "sd post", "load pre", "load post"]


@pytest.mark.parametrize("backend,gate", MATRIX)
def test_zero_grad_steps(backend, gate):
    """No grads: a no-op that creates no state. Zero grads: a real step (moments decay, weight
    decay applies), exactly as torch.optim.AdamW takes it with gate="none"."""
    m = model()
    opt = SNRAdamW(m.parameters(), lr=1e-2, gate=gate, backend=backend)
    m.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in m.parameters()]
    opt.step()
    assert len(opt.state) == 0 and all(torch.equal(a, b) for a, b in zip(m.parameters(), before))
    twin = copy.deepcopy(m)
    adamw = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    for step in range(3):
        for mm, o in ((m, opt), (twin, adamw)):
            backward(mm, step) if step < 2 else [p.grad.zero_() for p in mm.parameters()]
            o.step()
    if gate == "none":
        for a, b in zip(m.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(opt.state[p]["step"].item() == 3 for p in m.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["snr", "soft", "hard"])
def test_zero_grads_step_every_gate_as_the_reference(backend, gate):
    """Issue 24: zero grads are a real step (moments decay, weight decay applies) for every gate,
    not only for gate="none": two real steps, then two of zero grads, against the float64 reference."""
    from snr_triton.hyperparams import DEFAULTS

    gen = torch.Generator().manual_seed(4)
    init = torch.randn(20, generator=gen)
    grads = [torch.randn(20, generator=gen), torch.randn(20, generator=gen), torch.zeros(20), torch.zeros(20)]
    hp = dict(DEFAULTS, gate=gate, lr=1e-2, weight_decay=0.1, alpha=0.5)
    p, opt, ref = step_beside_reference(init, grads, backend, hp)
    torch.testing.assert_close(p.detach().cpu().double(), ref, rtol=1e-6, atol=1e-7)
    assert opt.state[p]["step"].item() == 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [1.0, 0.5])
def test_a_weight_decay_of_one_decays_like_adamws(backend, weight_decay):
    """weight_decay = 1 is valid (a strong decay, lr * 1 per step) and must not be mistaken for
    "no decay": three steps against torch.optim.AdamW with gate="none"."""
    m = model()
    twin = copy.deepcopy(m)
    opt = SNRAdamW(m.parameters(), lr=0.05, weight_decay=weight_decay, gate="none", backend=backend)
    adamw = torch.optim.AdamW(twin.parameters(), lr=0.05, weight_decay=weight_decay)
    for step in range(3):
        for mm, o in ((m, opt), (twin, adamw)):
            backward(mm, step)
            o.step()
    for a, b in zip(m.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_state_of_a_param_that_never_stepped_reads_as_an_empty_dict_like_adamws():
    """opt.state is torch's defaultdict(dict): code that reads opt.state[p] for any param (a
    logger, a state-offloading hook) gets {} for one without states, before and after steps."""
    ours = [torch.nn.Parameter(torch.ones(3, device=DEVICE)) for _ in range(2)]
    theirs = [torch.nn.Parameter(torch.ones(3, device=DEVICE)) for _ in range(2)]
    opt, ref = SNRAdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    assert opt.state[ours[0]] == {} == ref.state[theirs[0]]
    for params, o in ((ours, opt), (theirs, ref)):
        params[1].grad = torch.ones(3, device=DEVICE)
        o.step()
    assert opt.state[ours[0]] == {} == ref.state[theirs[0]]
    assert opt.state[ours[1]]["step"].item() == ref.state[theirs[1]]["step"].item() == 1


def test_the_defaults_are_adamws_and_the_specs():
    """lr, betas, eps, weight_decay and maximize as torch.optim.AdamW's; the SNR ones as
    ALGORITHM.md's table gives them."""
    p = torch.nn.Parameter(torch.ones(3))
    ours, theirs = SNRAdamW([p]).defaults, torch.optim.AdamW([p]).defaults
    assert {k: ours[k] for k in ("lr", "betas", "eps", "weight_decay", "maximize")} == \
        {k: theirs[k] for k in ("lr", "betas", "eps", "weight_decay", "maximize")}
    assert {k: ours[k] for k in ("rho", "gate", "alpha", "softness", "gate_eps", "warmup_steps", "max_grad_norm")} == \
        {"rho": 0.99, "gate": "snr", "alpha": 1.0, "softness": 1.0, "gate_eps": 1e-16, "warmup_steps": 0,
         "max_grad_norm": None}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_group_added_as_one_tensor_not_in_a_list_steps_like_adamws(backend):
    """torch.optim accepts {"params": tensor} in add_param_group: the tensor is the group's one
    param (not its rows)."""
    torch.manual_seed(0)
    v, w = torch.randn(2, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    ours = [torch.nn.Parameter(v.clone()), torch.nn.Parameter(w.clone())]
    theirs = [torch.nn.Parameter(v.clone()), torch.nn.Parameter(w.clone())]
    opt = SNRAdamW([ours[0]], gate="none", backend=backend)
    ref = torch.optim.AdamW([theirs[0]])
    opt.add_param_group({"params": ours[1], "lr": 0.05})
    ref.add_param_group({"params": theirs[1], "lr": 0.05})
    assert len(opt.param_groups[1]["params"]) == 1 and opt.param_groups[1]["params"][0] is ours[1]
    for k in range(3):
        grads = [torch.randn(2, device=DEVICE), torch.randn(3, 4, device=DEVICE)]
        for o, params in ((opt, ours), (ref, theirs)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            o.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-7)
