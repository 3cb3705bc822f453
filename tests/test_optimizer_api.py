"""torch.optim contracts: groups, checkpoints, schedulers, closures, hooks, layouts, dtypes."""

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch

from conftest import BACKENDS, DEVICE, warned_from
from snr_triton import SNRAdamW, reference
from snr_triton.hyperparams import DEFAULTS


EPS32 = torch.finfo(torch.float32).eps  # one ulp, relative, at most


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


def grad_stream(shapes, steps, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in shapes] for _ in range(steps)]


def make_params(shapes, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(DEVICE)) for s in shapes]


def run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = None if g is None else g.clone()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("maximize", [False, True])
def test_gate_none_matches_torch_adamw_fp32(backend, maximize):
    shapes = [(64, 32), (32,), (7,)]
    ours, theirs = make_params(shapes), make_params(shapes)
    grads = grad_stream(shapes, 100)
    hp = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, maximize=maximize)
    run(SNRAdamW(ours, gate="none", backend=backend, **hp), ours, grads)
    run(torch.optim.AdamW(theirs, **hp), theirs, grads)
    for a, b in zip(ours, theirs):
        assert rel(a, b) <= 1e-6


def test_gate_none_matches_torch_adamw_fp64():
    shapes = [(16, 8), (5,)]
    ours, theirs = make_params(shapes, dtype=torch.float64), make_params(shapes, dtype=torch.float64)
    grads = grad_stream(shapes, 100, dtype=torch.float64)
    run(SNRAdamW(ours, gate="none", lr=3e-3, backend="eager"), ours, grads)
    run(torch.optim.AdamW(theirs, lr=3e-3), theirs, grads)
    for a, b in zip(ours, theirs):
        assert rel(a, b) <= 1e-12


def reference_run(params0, grads, hps, lrs=None):
    """The float64 reference on copies of params0; hps[i] are param i's hyperparameters."""
    ps = [p.detach().clone() for p in params0]
    sts = [reference.new_state(p) for p in ps]
    for k, gs in enumerate(grads):
        for i, (p, g) in enumerate(zip(ps, gs)):
            if g is not None:
                hp = dict(hps[i], lr=lrs[k] if lrs else hps[i]["lr"])
                reference.reference_step(p, g, sts[i], **hp)
    return ps, sts


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_and_add_param_group(backend):
    shapes = [(9,), (4, 3), (5,)]
    params = make_params(shapes)
    p0 = [p.detach().clone() for p in params]
    g0 = dict(DEFAULTS, lr=1e-2, alpha=0.7)
    g1 = dict(g0, lr=5e-3, gate="soft", rho=0.9, weight_decay=0.1)
    g2 = dict(g0, lr=2e-2, gate="hard", betas=(0.8, 0.9), alpha=0.3)
    opt = SNRAdamW([{"params": params[:1]}, {"params": params[1:2], "lr": 5e-3, "gate": "soft",
                                             "rho": 0.9, "weight_decay": 0.1}],
                   lr=1e-2, alpha=0.7, backend=backend)
    grads = grad_stream(shapes, 8)
    early = [[g[0], g[1], None] for g in grads[:3]]
    run(opt, params, early)
    opt.add_param_group({"params": params[2:], "lr": 2e-2, "gate": "hard", "betas": (0.8, 0.9), "alpha": 0.3})
    run(opt, params, grads[3:])
    refs, _ = reference_run(p0, early + grads[3:], [g0, g1, g2])
    for p, r in zip(params, refs):
        assert rel(p, r) <= 8 * EPS32  # one float32 ulp per step
    assert opt.state[params[2]]["step"].item() == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_is_bit_exact(backend):
    shapes = [(33,), (6, 5), (0,)]
    grads = grad_stream(shapes, 10)
    straight = make_params(shapes)
    run(SNRAdamW(straight, lr=1e-2, backend=backend), straight, grads)

    resumed = make_params(shapes)
    opt = SNRAdamW(resumed, lr=1e-2, backend=backend)
    run(opt, resumed, grads[:5])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in resumed], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    fresh = make_params(shapes, seed=99)
    with torch.no_grad():
        for p, s in zip(fresh, saved["params"]):
            p.copy_(s)
    opt2 = SNRAdamW(fresh, lr=1e-2, backend=backend)
    opt2.load_state_dict(saved["opt"])
    run(opt2, fresh, grads[5:])
    for a, b in zip(fresh, straight):
        assert torch.equal(a, b)
    for a, b in zip(fresh, straight):
        assert opt2.state[a]["step"].item() == 10
    sd = opt2.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "exp_grad_var"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_adamw_checkpoint(backend):
    shapes = [(20,), (4, 4)]
    grads = grad_stream(shapes, 10)
    adam_params = make_params(shapes)
    adamw = torch.optim.AdamW(adam_params, lr=1e-2, weight_decay=0.05)
    run(adamw, adam_params, grads[:5])
    sd = copy.deepcopy(adamw.state_dict())

    ours = [torch.nn.Parameter(p.detach().clone()) for p in adam_params]
    opt = SNRAdamW(ours, gate="none", backend=backend)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["gate"] == "none"
    assert "amsgrad" not in opt.param_groups[0]
    # exp_grad_var derived as ALGORITHM.md says, checked against the float64 reference's rule
    for p, key in zip(ours, sd["state"]):
        st = sd["state"][key]
        expected = reference.exp_grad_var_from_adam(st["exp_avg"], st["exp_avg_sq"], st["step"].item(),
                                                    (0.9, 0.999), 0.99)
        assert rel(opt.state[p]["exp_grad_var"], expected) <= 1e-6
    run(opt, ours, grads[5:])
    run(adamw, adam_params, grads[5:])
    for a, b in zip(ours, adam_params):
        assert rel(a, b) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler(backend):
    shapes = [(17,)]
    params = make_params(shapes)
    p0 = [p.detach().clone() for p in params]
    opt = SNRAdamW(params, lr=1e-2, alpha=0.7, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    grads = grad_stream(shapes, 6)
    lrs = []
    for gs in grads:
        lrs.append(opt.param_groups[0]["lr"])
        params[0].grad = gs[0].clone()
        opt.step()
        sched.step()
    assert lrs == [1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3]
    refs, _ = reference_run(p0, grads, [dict(DEFAULTS, alpha=0.7)], lrs=lrs)
    assert rel(params[0], refs[0]) <= 6 * EPS32


@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_zero_grad_and_none_grads(backend):
    w = make_params([(3,), (2,)])
    opt = SNRAdamW(w, backend=backend)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (w[0] ** 2).sum()
        loss.backward()
        return loss

    before = w[1].detach().clone()
    loss = opt.step(closure)
    assert calls == [1] and loss.item() > 0
    assert torch.equal(w[1].detach(), before)  # grad None: skipped, no state created
    assert w[1] not in opt.state and opt.state[w[0]]["step"].item() == 1
    opt.zero_grad()
    assert w[0].grad is None
    w[0].grad = torch.ones_like(w[0])
    opt.zero_grad(set_to_none=False)
    assert torch.equal(w[0].grad, torch.zeros_like(w[0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_params(backend):
    transposed = torch.nn.Parameter(torch.randn(5, 7, device=DEVICE).t())  # dense, not contiguous
    strided = torch.randn(6, 8, device=DEVICE)[:, ::2].requires_grad_()  # not dense
    params = [transposed, strided]
    p0 = [p.detach().clone() for p in params]
    grads = grad_stream([(7, 5), (6, 4)], 5)
    # grads with the param's strides, and one with other strides
    grads = [[g[0].t().contiguous().t(), g[1]] for g in grads]
    opt = SNRAdamW(params, lr=1e-2, alpha=0.7, backend=backend)
    run(opt, params, grads)
    refs, _ = reference_run(p0, grads, [dict(DEFAULTS, lr=1e-2, alpha=0.7)] * 2)
    for p, r in zip(params, refs):
        assert rel(p, r) <= 5 * EPS32
    assert not strided.is_contiguous() and strided.stride() == (8, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_equals_float_lr(backend):
    shapes = [(12,)]
    grads = grad_stream(shapes, 4)
    a, b = make_params(shapes), make_params(shapes)
    run(SNRAdamW(a, lr=torch.tensor(3e-3, device=DEVICE), backend=backend), a, grads)
    run(SNRAdamW(b, lr=3e-3, backend=backend), b, grads)
    assert rel(a[0], b[0]) <= 1e-7


@pytest.mark.parametrize("where", ["groups", "groups and defaults"])
def test_unpickling_an_older_versions_optimizer_fills_its_missing_keys(where):
    """An optimizer pickled by a version without some of today's keys: its groups get the
    optimizer's default for them, or the package's where its defaults lack them too."""
    p = make_params([(5,)])[0]
    opt = SNRAdamW([p], softness=0.5)
    state = opt.__getstate__()
    for key in ("softness", "state_dtype"):
        del state["param_groups"][0][key]
        if where == "groups and defaults":
            del state["defaults"][key]
    old = SNRAdamW.__new__(SNRAdamW)
    old.__setstate__(state)
    group = old.param_groups[0]
    assert group["softness"] == (0.5 if where == "groups" else DEFAULTS["softness"])
    assert group["state_dtype"] == torch.float32
    p.grad = torch.ones(5, device=DEVICE)
    old.step()
    assert old.state[p]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcopy_and_pickle(backend):
    model = torch.nn.Linear(4, 3).to(DEVICE)
    opt = SNRAdamW(model.parameters(), lr=1e-2, backend=backend)
    x = torch.randn(5, 4, device=DEVICE)
    model(x).sum().backward()
    opt.step()
    twin_model, twin_opt = copy.deepcopy((model, opt))
    for m, o in ((model, opt), (twin_model, twin_opt)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
    unpickled = pickle.loads(pickle.dumps(opt))
    assert unpickled.param_groups[0]["gate"] == "snr" and unpickled.param_groups[0]["backend"] == backend
    for key in ("exp_avg", "exp_avg_sq", "exp_grad_var", "step"):
        assert torch.equal(unpickled.state_dict()["state"][0][key], opt.state_dict()["state"][0][key])


def test_repr_and_step_hooks():
    p = make_params([(3,)])
    opt = SNRAdamW(p, gate="soft", backend="eager")
    text = repr(opt)
    assert text.startswith("SNRAdamW") and "gate: soft" in text and "rho: 0.99" in text
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    p[0].grad = torch.ones_like(p[0])
    opt.step()
    assert seen == ["pre", "post"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_params_step_their_real_view(backend):
    gen = torch.Generator().manual_seed(3)
    z0 = torch.randn(6, 2, generator=gen).to(DEVICE)
    z = torch.nn.Parameter(torch.view_as_complex(z0.clone()))
    r = torch.nn.Parameter(z0.clone())
    grads = [torch.randn(6, 2, generator=gen).to(DEVICE) for _ in range(4)]
    oz, orr = SNRAdamW([z], lr=1e-2, backend=backend), SNRAdamW([r], lr=1e-2, backend=backend)
    for g in grads:
        z.grad, r.grad = torch.view_as_complex(g.clone()), g.clone()
        oz.step()
        orr.step()
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())
    assert oz.state[z]["exp_avg"].is_complex()
    # a checkpoint of the real param's states (real views, shape (6, 2)) loads into the complex one
    resumed = SNRAdamW([z], lr=1e-2, backend=backend)
    resumed.load_state_dict(orr.state_dict())
    for key, value in orr.state[r].items():
        got = resumed.state[z][key]
        assert torch.equal(torch.view_as_real(got) if got.is_complex() else got, value), key


def test_backend_auto_picks_the_fused_kernel_of_the_device():
    p = make_params([(3,)])[0]
    fused = "triton" if p.device.type == "cuda" else ("cpu" if "cpu" in BACKENDS else "eager")
    assert SNRAdamW([p]).backend_of(p) == fused
    # what no fused kernel serves goes to the eager path
    p64 = make_params([(3,)], dtype=torch.float64)[0]
    assert SNRAdamW([p64]).backend_of(p64) == "eager"
    if p.device.type == "cpu":
        assert SNRAdamW([p], stochastic_rounding=True).backend_of(p) == "eager"
    with pytest.raises(KeyError) as e:
        SNRAdamW([p]).backend_of(p64)
    assert e.value.args == ("param is not in this optimizer",)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_with_state_but_no_grad_is_left_alone(backend):
    """A param stepped before but without a grad now: its step and state stay (index path)."""
    shapes = [(9,), (5,), (4,)]
    params = make_params(shapes)
    p0 = [p.detach().clone() for p in params]
    grads = grad_stream(shapes, 4)
    schedule = [grads[0], [grads[1][0], None, grads[1][2]], [None, grads[2][1], None], grads[3]]
    opt = SNRAdamW(params, lr=1e-2, alpha=0.7, backend=backend)
    run(opt, params, schedule)
    refs, states = reference_run(p0, schedule, [dict(DEFAULTS, lr=1e-2, alpha=0.7)] * 3)
    for p, r, st in zip(params, refs, states):
        assert opt.state[p]["step"].item() == st["step"]
        assert rel(p, r) <= 4 * EPS32
    assert [opt.state[p]["step"].item() for p in params] == [3, 3, 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_adamw_checkpoint_with_other_betas_and_rho_closed_form(backend):
    """Issue 24: the AdamW-loading test took its expected exp_grad_var from the very function the
    code calls, with default betas and rho only. Here: betas (0.8, 0.95), rho 0.9, after 4 AdamW
    steps; ALGORITHM.md: s-hat = max(v-hat - m-hat^2, 0), stored as s = s-hat * (1 - rho^t)."""
    shapes = [(6,), (2, 3)]
    theirs = make_params(shapes)
    adamw = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.8, 0.95))
    run(adamw, theirs, grad_stream(shapes, 4))
    ours = make_params(shapes)
    opt = SNRAdamW(ours, lr=1e-2, betas=(0.8, 0.95), rho=0.9, backend=backend)
    opt.load_state_dict(adamw.state_dict())
    t = 4
    for p, q in zip(ours, theirs):
        m, v = adamw.state[q]["exp_avg"].double(), adamw.state[q]["exp_avg_sq"].double()
        mhat, vhat = m / (1 - 0.8**t), v / (1 - 0.95**t)
        expected = torch.clamp(vhat - mhat * mhat, min=0) * (1 - 0.9**t)
        torch.testing.assert_close(opt.state[p]["exp_grad_var"].double(), expected, rtol=1e-6, atol=1e-12)
        assert opt.state[p]["step"].item() == t


def test_an_amsgrad_checkpoint_loads_with_a_warning_and_without_max_exp_avg_sq():
    shapes = [(5,)]
    theirs = make_params(shapes)
    adamw = torch.optim.AdamW(theirs, lr=1e-2, amsgrad=True)
    run(adamw, theirs, grad_stream(shapes, 2))
    assert "max_exp_avg_sq" in adamw.state[theirs[0]]
    ours = make_params(shapes)
    opt = SNRAdamW(ours, lr=1e-2)
    with pytest.warns(UserWarning, match="amsgrad=True: SNRAdamW has no amsgrad; max_exp_avg_sq is ignored") as said:
        opt.load_state_dict(adamw.state_dict())
    assert warned_from(said, __file__) == [__file__]  # the line that loads, not torch's wrapper
    assert set(opt.state[ours[0]]) == {"step", "exp_avg", "exp_avg_sq", "exp_grad_var"}
    assert "amsgrad" not in opt.param_groups[0]
    torch.testing.assert_close(opt.state[ours[0]]["exp_avg_sq"], adamw.state[theirs[0]]["exp_avg_sq"])


def _state_tensors(opt):
    return [t for entry in opt.state.values() for t in entry.values() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.uint8], ids=["fp32_states", "8bit_states"])
def test_a_deleted_optimizer_frees_its_states_at_once_as_adamw_does(backend, state_dtype):
    """With the cyclic collector off, `del opt` must free every state tensor, as it does for
    torch.optim.AdamW: a reference cycle (a param's slot and its bucket, a slot and its
    opt.state entry) kept an optimizer's states, gigabytes on a GPU, until the next collection,
    which counts Python objects, not bytes (a two-dtype `snr-triton bench` run at 128M params
    ran out of memory in its second cell, the first cell's optimizers still held)."""
    def train(opt, params):
        for step in range(3):
            opt.zero_grad()  # fresh grad objects every step
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()

    def use(make):
        params = make_params([(300,), (4, 70)])
        opt = make(params)
        train(opt, params)
        opt.load_state_dict(opt.state_dict())  # states adopted again from a checkpoint
        train(opt, params)
        if isinstance(opt, SNRAdamW):
            opt.stats(), opt.last_grad_norm()
        return opt

    for make in (lambda ps: torch.optim.AdamW(ps),
                 lambda ps: SNRAdamW(ps, backend=backend, state_dtype=state_dtype, max_grad_norm=1.0,
                                     track_stats=True)):
        use(make)  # once first: torch's first step in a process keeps frames (its lazy imports)
        gc.collect()
        gc.disable()
        try:
            opt = use(make)
            name = type(opt).__name__
            alive = [weakref.ref(t) for t in _state_tensors(opt)] + [weakref.ref(opt)]
            assert len(alive) > 6
            del opt
            assert [r() is None for r in alive] == [True] * len(alive), name
        finally:
            gc.enable()
