"""Bad input: a clear error naming the argument and the valid choices, and nothing changed."""

import copy

import pytest
import torch

from conftest import BACKENDS, DEVICE
from snr_triton import SNRAdamW, finite_alpha

BAD = [
    ("lr", -1.0, "lr"), ("lr", float("nan"), "lr"), ("lr", torch.tensor([1e-3, 1e-3]), "lr"),
    ("betas", (1.0, 0.999), r"betas\[0\]"), ("betas", (0.9, -0.1), r"betas\[1\]"),
    ("betas", (0.9,), "betas"), ("rho", 1.0, "rho"), ("rho", -0.5, "rho"),
    ("eps", 0.0, "eps"), ("weight_decay", -1e-2, "weight_decay"), ("alpha", -1.0, "alpha"),
    ("softness", -0.1, "softness"), ("gate_eps", 0.0, "gate_eps"),
    ("warmup_steps", -1, "warmup_steps"), ("warmup_steps", 1.5, "warmup_steps"),
    ("warmup_steps", True, "warmup_steps"), ("maximize", "yes", "maximize"),
    ("gate", "snrr", "gate must be one of 'snr', 'soft', 'hard', 'none'"),
    ("backend", "cuda", "backend must be one of 'auto', 'triton', 'cpu', 'eager'"),
    ("state_dtype", torch.float16, "state_dtype"), ("track_stats", 1, "track_stats"),
]


@pytest.mark.parametrize("name,value,pattern", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_constructor_rejects(name, value, pattern):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=pattern) as info:
        SNRAdamW([p], **{name: value})
    message = str(info.value)
    assert "got" in message  # the offending value is echoed back
    if not isinstance(value, (torch.Tensor, tuple)):
        assert repr(value) in message or str(value) in message


def test_range_is_named():
    with pytest.raises(ValueError, match=r"rho must be in \[0.0, 1.0\), got 1.5"):
        SNRAdamW([torch.nn.Parameter(torch.ones(1))], rho=1.5)


@pytest.mark.parametrize("name,value,pattern", BAD[:8])
def test_add_param_group_rejects_and_adds_nothing(name, value, pattern):
    opt = SNRAdamW([torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(ValueError, match=pattern):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], name: value})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_group_edit_is_caught_at_step_and_changes_nothing(backend):
    p = torch.nn.Parameter(torch.ones(4, device=DEVICE))
    q = torch.nn.Parameter(torch.ones(4, device=DEVICE))
    opt = SNRAdamW([{"params": [p]}, {"params": [q]}], backend=backend)
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    params_before = (p.detach().clone(), q.detach().clone())
    opt.param_groups[1]["gate"] = "bogus"
    with pytest.raises(ValueError, match=r"gate must be one of .* \(param group 1\)"):
        opt.step()
    assert torch.equal(p, params_before[0]) and torch.equal(q, params_before[1])
    after = opt.state_dict()
    for k in before["state"]:
        for key, t in before["state"][k].items():
            assert torch.equal(after["state"][k][key], t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_gradients_raise_and_change_nothing(backend):
    dense = torch.nn.Parameter(torch.ones(3, device=DEVICE))
    emb = torch.nn.Embedding(5, 2, sparse=True).to(DEVICE)
    opt = SNRAdamW([dense, *emb.parameters()], backend=backend)
    dense.grad = torch.ones_like(dense)
    emb(torch.tensor([1, 2], device=DEVICE)).sum().backward()
    with pytest.raises(RuntimeError) as e:
        opt.step()
    assert str(e.value) == ("SNRAdamW does not support sparse gradients (param 1 of param group 0); use dense "
                            "gradients (e.g. nn.Embedding(sparse=False))")
    assert torch.equal(dense.detach(), torch.ones(3, device=DEVICE)) and len(opt.state) == 0


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C backend is not built here")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_a_param_turned_into_a_dtype_its_named_backend_cannot_step_is_refused_by_group(dtype):
    """Checked when the param comes back to the step with its new dtype (its slot no longer
    fits), naming the group whose backend it is; nothing changes."""
    p, q = torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.ones(4))
    opt = SNRAdamW([q], backend="cpu")
    opt.add_param_group({"params": [p]})
    p.grad, q.grad = torch.ones(8), torch.ones(4)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}, q.detach().clone()
    p.data = p.data.to(dtype)
    p.grad, q.grad = torch.ones(8, dtype=dtype), torch.ones(4)
    with pytest.raises(RuntimeError) as e:
        opt.step()
    assert str(e.value) == (f"backend='cpu' cannot step a {dtype} param on cpu: it supports float32 and bfloat16 "
                            f"params; use backend='eager' or 'auto' for {dtype} (param group 1)")
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[0].items()) and torch.equal(q, before[1])


# equal to a valid value (0 == False, 0.0 == 0) but of a type validation refuses
EQUAL_BUT_INVALID = [("lr", True, "lr"), ("maximize", 0, "maximize"), ("track_stats", 0, "track_stats"),
                     ("warmup_steps", 0.0, "warmup_steps"), ("stochastic_rounding", 0, "stochastic_rounding")]


@pytest.mark.parametrize("name,value,pattern", BAD + EQUAL_BUT_INVALID,
                         ids=[f"{b[0]}={b[1]!r}" for b in BAD + EQUAL_BUT_INVALID])
def test_a_bad_value_set_after_good_steps_is_refused_at_the_next_step(name, value, pattern):
    """A step validates a group's settings once per distinct set of values but lr, and lr alone
    (host time with many groups); a value set between steps is still checked, one equal to a
    validated value but of another type included, and nothing changes; the good value back, the
    run goes on."""
    p = torch.nn.Parameter(torch.ones(3, device=DEVICE))
    opt = SNRAdamW([p], lr=1.0)  # True == 1.0
    for _ in range(2):
        p.grad = torch.ones_like(p)
        opt.step()
    before, param_before = copy.deepcopy(opt.state_dict()), p.detach().clone()
    good = opt.param_groups[0][name]
    opt.param_groups[0][name] = value
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=pattern) as info:
        opt.step()
    assert "(param group 0)" in str(info.value)
    assert torch.equal(p, param_before)
    assert all(torch.equal(opt.state[p][k], v) for k, v in before["state"][0].items())
    opt.param_groups[0][name] = good
    opt.step()
    assert opt.state[p]["step"].item() == 3


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C backend is not built here")
def test_a_group_switched_by_hand_to_a_backend_that_cannot_step_its_params_is_refused():
    """group["backend"] set between steps: its params' slots still fit, so it is the step's choice
    of backend per bucket that refuses, naming the group; nothing changes."""
    q, p = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(8, dtype=torch.float16))
    opt = SNRAdamW([q])
    opt.add_param_group({"params": [p]})
    q.grad, p.grad = torch.ones(4), torch.ones(8, dtype=torch.float16)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}, q.detach().clone(), p.detach().clone()
    opt.param_groups[1]["backend"] = "cpu"
    with pytest.raises(RuntimeError) as e:
        opt.step()
    assert str(e.value) == ("backend='cpu' cannot step a torch.float16 param on cpu: it supports float32 and "
                            "bfloat16 params; use backend='eager' or 'auto' for torch.float16 (param group 1)")
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[0].items())
    assert torch.equal(q, before[1]) and torch.equal(p, before[2])


def test_load_state_dict_rejects_bad_groups_and_keeps_state():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SNRAdamW([p], backend="eager")
    p.grad = torch.ones(3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["rho"] = 2.0
    with pytest.raises(ValueError, match="rho.*state dict"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["rho"] == 0.99


def test_finite_alpha():
    assert finite_alpha(32, 1032) == 32 / 1000
    for b, n in ((0, 10), (10, 10), (11, 10), (-1, 5)):
        with pytest.raises(ValueError, match="0 < batch_size < dataset_size"):
            finite_alpha(b, n)
    with pytest.raises(ValueError, match="batch_size must be an int"):
        finite_alpha(2.5, 10)
    with pytest.raises(ValueError, match="dataset_size must be an int"):
        finite_alpha(2, 10.0)
    assert finite_alpha(1, 11) == 1 / 10  # the smallest batch: b = 1 is valid


@pytest.mark.parametrize("name", ["lr", "betas"])
@pytest.mark.parametrize("bad,pattern", [(torch.tensor([1, 2]), "must hold one element"),
                                         (torch.tensor(1), "must be floating point")])
def test_tensor_hyperparameters_of_the_wrong_shape_or_dtype_are_refused(name, bad, pattern):
    p = torch.nn.Parameter(torch.ones(3))
    kw = {"lr": bad} if name == "lr" else {"betas": (bad, torch.tensor(0.999))}
    with pytest.raises(ValueError, match=rf"{'lr' if name == 'lr' else 'betas.0.'} as a tensor {pattern}"):
        SNRAdamW([p], **kw)


def _trained_opt(backend="eager"):
    params = [torch.nn.Parameter(torch.randn(4, 3, device=DEVICE)), torch.nn.Parameter(torch.randn(5, device=DEVICE))]
    opt = SNRAdamW([{"params": params[:1]}, {"params": params[1:], "lr": 1e-2}], backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return params, opt


def _corrupt(kind, sd):
    sd = copy.deepcopy(sd)
    if kind == "wrong shape":
        sd["state"][0]["exp_avg"] = torch.zeros(3, 4)
    elif kind == "missing key":
        del sd["state"][1]["exp_avg_sq"]
    elif kind == "missing keys":
        del sd["state"][1]["exp_avg_sq"], sd["state"][1]["exp_avg"]
    elif kind == "state not a tensor":
        sd["state"][0]["exp_avg_sq"] = sd["state"][0]["exp_avg_sq"].tolist()
    elif kind == "step of two numbers":
        sd["state"][1]["step"] = torch.tensor([1.0, 1.0])
    elif kind == "not a dict":
        sd["state"][0] = list(sd["state"][0].values())
    elif kind == "wrong group count":
        sd["param_groups"] = sd["param_groups"][:1]
    elif kind == "wrong group size":
        sd["param_groups"][1]["params"] = sd["param_groups"][1]["params"] + [7]
    return sd


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,pattern", [
    ("wrong shape", r"^state 'exp_avg' of param 0 has shape \(3, 4\), its param \(4, 3\)$"),
    ("missing key", "the state of param 1 lacks exp_avg_sq"),
    ("missing keys", r"^the state of param 1 lacks exp_avg, exp_avg_sq \(needs step, exp_avg, exp_avg_sq; "
                     r"exp_grad_var optional; 8-bit states as <key>_codes and <key>_scales\)$"),
    ("not a dict", "^the state of param 0 must be a dict, got list$"),
    ("state not a tensor", "^state 'exp_avg_sq' of param 0 must be a tensor, got list$"),
    ("step of two numbers", r"^state 'step' of param 1 must hold one number, got shape \(2,\)$"),
    ("wrong group count", "the state dict has 1 param groups, this optimizer 2"),
    ("wrong group size", "param group 1 of the state dict has 2 params, this optimizer's 1"),
])
def test_load_state_dict_refuses_a_mismatched_checkpoint_and_keeps_state(backend, kind, pattern):
    params, opt = _trained_opt("eager")
    sd = _corrupt(kind, opt.state_dict())
    _, target = _trained_opt(backend)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=pattern):
        target.load_state_dict(sd)
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, st in before["state"].items():
        for key, value in st.items():
            assert torch.equal(after["state"][i][key], value), (i, key)


# The whole message, as a user reads it: the argument's name, the valid range with its open or
# closed ends, the value given (mutmut: names, brackets and "inf" in messages survived a match
# on the name alone).
EXACT_MESSAGES = [
    (dict(lr=-1.0), "lr must be in [0.0, inf), got -1.0"),
    (dict(lr=torch.tensor(-1.0)), "lr must be in [0.0, inf), got -1.0"),
    (dict(eps=0.0), "eps must be in (0.0, inf), got 0.0"),
    (dict(weight_decay=-0.1), "weight_decay must be in [0.0, inf), got -0.1"),
    (dict(rho=1.0), "rho must be in [0.0, 1.0), got 1.0"),
    (dict(alpha=-1.0), "alpha must be in [0.0, inf), got -1.0"),
    (dict(softness=-1.0), "softness must be in [0.0, inf), got -1.0"),
    (dict(gate_eps=0.0), "gate_eps must be in (0.0, inf), got 0.0"),
    (dict(eps="1e-8"), "eps must be a real number in (0.0, inf), got '1e-8'"),
    (dict(betas=(torch.tensor(1.0), torch.tensor(0.9))), "betas[0] must be in [0.0, 1.0), got 1.0"),
    (dict(state_dtype=torch.float16),
     "state_dtype must be one of torch.float32, torch.bfloat16, torch.uint8; got torch.float16"),
]


@pytest.mark.parametrize("kwargs,message", EXACT_MESSAGES, ids=[next(iter(k)) + str(i) for i, (k, _) in
                                                                 enumerate(EXACT_MESSAGES)])
def test_a_bad_value_gets_a_message_naming_it_its_range_and_the_value(kwargs, message):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError) as info:
        SNRAdamW([p], **kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize("lr", [0.0, torch.tensor(0.0)], ids=["float", "tensor"])
def test_lr_zero_is_valid_and_moves_nothing(lr):
    """The lower end of lr's range is closed, as in torch.optim.AdamW (a warmup schedule starts at 0)."""
    p = torch.nn.Parameter(torch.randn(5))
    before = p.detach().clone()
    opt = SNRAdamW([p], lr=lr, weight_decay=0.1)
    p.grad = torch.randn(5)
    opt.step()
    assert torch.equal(p.detach(), before)


def test_add_param_groups_refusals_name_the_group_and_add_nothing():
    """The group's index ends each message (the constructor's groups and later ones alike), and
    a refused group leaves the optimizer as it was."""
    P = torch.nn.Parameter
    opt = SNRAdamW([P(torch.ones(3))])
    a = P(torch.ones(2))
    refused = [
        ({"params": [P(torch.ones(2))], "lr": -1.0}, ValueError, "lr must be in [0.0, inf), got -1.0 (param group 1)"),
        ({"params": [P(torch.ones(2, dtype=torch.float16))], "backend": "cpu"}, RuntimeError,
         "backend='cpu' cannot step a torch.float16 param on cpu: it supports float32 and bfloat16 params; use "
         "backend='eager' or 'auto' for torch.float16 (param group 1)"),
        ({"params": [("a", a), ("a2", a)]}, ValueError,
         "param 1 ('a2') of param group 1 is the same tensor as param 0 of that group: each param may appear once "
         "(it would be stepped twice)"),
        ({"params": [P(torch.ones(2))], "max_grad_norm": 1.0}, ValueError,
         "max_grad_norm is the whole optimizer's (one norm over every group): pass it to "
         "SNRAdamW(..., max_grad_norm=...), not in param group 1"),
    ]
    for group, error, message in refused:
        if "cpu" not in BACKENDS and error is RuntimeError:
            continue  # the C backend is not built here
        with pytest.raises(error) as e:
            opt.add_param_group(group)
        assert str(e.value) == message
        assert len(opt.param_groups) == 1 and not opt.state
