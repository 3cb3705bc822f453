"""What users do between steps, against torch.optim.AdamW (gate="none") as the truth.

A fresh grad object every step (zero_grad() + backward), params edited or resized, states
reset or replaced by hand, a param listed twice, params joining late, huge finite grads,
AdamW's positional arguments, load_state_dict hooks. Each either steps exactly as AdamW does
or is refused with an error naming the param, with nothing changed.
"""

import copy
import gc
import io
import weakref
from collections import defaultdict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import BACKENDS, DEVICE, step_beside_reference
from snr_triton import SNRAdamW, tables
from snr_triton.param_states import MAPS_KEPT

HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
KEYS = ("exp_avg", "exp_avg_sq")


def pair(shapes, backend, seed=1, **kw):
    gen = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return (ours, SNRAdamW(ours, gate="none", backend=backend, **HP, **kw)), (theirs, torch.optim.AdamW(theirs, **HP))


def give(params, grads, in_place=False):
    for p, g in zip(params, grads):
        if in_place and g is not None and p.grad is not None and p.grad.shape == g.shape:
            p.grad.copy_(g)  # zero_grad(set_to_none=False) + backward: the same grad object
        else:
            p.grad = None if g is None else g.clone()  # a fresh grad object, as zero_grad() + backward


def step_both(ours, opt, theirs, ref, grads, max_grad_norm=None, in_place=False):
    """One step of each optimizer with the same grads (fresh objects, or written into the last
    step's); with max_grad_norm, AdamW's grads are clipped first by torch, over the params it
    steps (ours clips inside its step)."""
    give(ours, grads, in_place)
    give(theirs, grads, in_place)
    opt.step()
    if max_grad_norm is not None:
        stepped = [q for group in ref.param_groups for q in group["params"] if q.grad is not None]
        torch.nn.utils.clip_grad_norm_(stepped, max_grad_norm)
    ref.step()


def random_steps(ours, opt, theirs, ref, gen, k):
    """k steps of each optimizer, each with the same fresh random grads."""
    for _ in range(k):
        step_both(ours, opt, theirs, ref, [torch.randn(p.shape, generator=gen).to(DEVICE) for p in ours])


def same(a, b, tol=1e-6):
    """fp32 params and states within one step's rounding of AdamW's."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def assert_like_adamw(ours, opt, theirs, ref):
    for p, q in zip(ours, theirs):
        same(p, q)
        if q in ref.state and ref.state[q]:
            assert opt.state[p]["step"].item() == ref.state[q]["step"].item()
            for k in KEYS:
                same(opt.state[p][k], ref.state[q][k])


def snapshot(params, opt):
    return copy.deepcopy(([p.detach().clone() for p in params],
                          {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)
                           if p in opt.state}))


def assert_unchanged(before, params, opt):
    values, states = before
    for p, v in zip(params, values):
        if p.shape == v.shape:
            assert torch.equal(p.detach(), v)
    for i, st_ in states.items():
        for k, v in st_.items():
            assert torch.equal(opt.state[params[i]][k], v), (i, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resized_param_is_refused_and_its_neighbours_keep_their_states(backend):
    """p.data = zeros(48) on a 16-element param: the old fused path wrote past its state slot
    into a neighbour's (exp_avg[0] 9.18 instead of 0.19). AdamW raises; so do we, naming the
    param, with nothing changed. After `del opt.state[p]` both go on alike."""
    (ours, opt), (theirs, ref) = pair([(16,), (16,), (16,)], backend)
    for _ in range(2):
        give(ours, [torch.ones(16, device=DEVICE)] * 3)
        give(theirs, [torch.ones(16, device=DEVICE)] * 3)
        opt.step()
        ref.step()
    for params in (ours, theirs):
        params[1].data = torch.zeros(48, device=DEVICE)
    grads = [torch.ones(16, device=DEVICE), torch.ones(48, device=DEVICE), torch.ones(16, device=DEVICE)]
    give(ours, grads)
    before = snapshot(ours, opt)
    with pytest.raises(ValueError) as e:
        opt.step()
    assert str(e.value) == (
        "state 'exp_avg' of param 1 of param group 0 has shape (16,), its param (48,) (the param changed shape "
        "since its state was made? torch.optim.AdamW refuses this too; reset the state with "
        "`del optimizer.state[p]`, or give the param back its shape)")
    assert_unchanged(before, ours, opt)
    give(theirs, grads)
    twin_params, twin = copy.deepcopy((theirs, ref))
    give(twin_params, grads)
    with pytest.raises(RuntimeError):  # AdamW refuses too (after changing some params: on a copy)
        twin.step()
    del opt.state[ours[1]]
    del ref.state[theirs[1]]
    for _ in range(2):
        step_both(ours, opt, theirs, ref, grads)
    assert_like_adamw(ours, opt, theirs, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", ["relaid_out", "new_storage", "to_bf16_and_back"])
def test_params_edited_between_steps_step_like_adamw(backend, edit):
    """Same shape, another layout or storage: the states follow the param's elements."""
    (ours, opt), (theirs, ref) = pair([(6, 5), (7,)], backend)
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(6, 5, generator=gen).to(DEVICE), torch.randn(7, generator=gen).to(DEVICE)]
             for _ in range(6)]
    for k, gs in enumerate(grads):
        if k == 3:
            for params in (ours, theirs):
                p = params[0]
                if edit == "relaid_out":  # the same values, column-major
                    p.data = p.data.t().contiguous().t()
                elif edit == "new_storage":
                    p.data = p.data.clone() * 0.5
                else:
                    p.data = p.data.to(torch.bfloat16).to(torch.float32)
            assert ours[0].stride() == theirs[0].stride()
        step_both(ours, opt, theirs, ref, gs)
    assert_like_adamw(ours, opt, theirs, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_state_tensors_are_adopted(backend):
    """The reset idiom: st = opt.state[p]; st[...] = zeros; st["step"] = tensor(0.). The old
    kernels kept their own buffers (step 0 and exp_avg 0 after a step; state_dict() saved the
    stale values); AdamW shows step 1 and exp_avg 0.1."""
    (ours, opt), (theirs, ref) = pair([(8,), (5,)], backend)
    grads = [torch.ones(8, device=DEVICE), torch.ones(5, device=DEVICE)]
    for _ in range(3):
        step_both(ours, opt, theirs, ref, grads)
    for o, params in ((opt, ours), (ref, theirs)):
        st_ = o.state[params[0]]
        st_["exp_avg"] = torch.zeros_like(params[0])
        st_["exp_avg_sq"] = torch.zeros_like(params[0])
        st_["step"] = torch.tensor(0.0)
    step_both(ours, opt, theirs, ref, grads)
    assert opt.state[ours[0]]["step"].item() == 1
    torch.testing.assert_close(opt.state[ours[0]]["exp_avg"], torch.full((8,), 0.1, device=DEVICE))
    assert_like_adamw(ours, opt, theirs, ref)
    saved = opt.state_dict()["state"][0]
    assert saved["step"].item() == 1 and torch.equal(saved["exp_avg"], opt.state[ours[0]]["exp_avg"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["del", "empty", "replaced", "clear", "state_replaced"])
@pytest.mark.parametrize("frozen", [False, True], ids=["training", "frozen"])
def test_states_reset_by_hand_start_afresh(backend, how, frozen):
    """States deleted or replaced, then steps: AdamW starts the param afresh (or from the states
    put there), also a frozen layer's, reset while it has no grad and trained again later. For
    that one the step after the edit saw the change but skipped the param, and later steps
    trusted the entries again: it stepped on with its old states, which neither opt.state nor
    state_dict() showed."""
    (ours, opt), (theirs, ref) = pair([(8,), (5,)], backend)
    gen = torch.Generator().manual_seed(0)
    given = (torch.rand(5, generator=gen) * 0.1).to(DEVICE), torch.randn(5, generator=gen).to(DEVICE)
    for k in range(7):
        gs = [torch.randn(8, generator=gen).to(DEVICE), torch.randn(5, generator=gen).to(DEVICE)]
        if frozen and k in (2, 3, 4):  # no grad for three steps
            gs[1] = None
        if k == 2:
            for o, params in ((opt, ours), (ref, theirs)):
                if how == "del":
                    del o.state[params[1]]
                elif how == "empty":
                    o.state[params[1]] = {}
                elif how == "replaced":  # an AdamW state made by hand: resumed from, as AdamW does
                    o.state[params[1]] = {"step": torch.tensor(4.0), "exp_avg_sq": given[0].clone(),
                                          "exp_avg": given[1].clone()}
                elif how == "clear":
                    o.state.clear()
                else:
                    o.state = defaultdict(dict)
        step_both(ours, opt, theirs, ref, gs)
        assert_like_adamw(ours, opt, theirs, ref)
    steps = (2 if frozen else 5) + (4 if how == "replaced" else 0)
    assert opt.state[ours[1]]["step"].item() == ref.state[theirs[1]]["step"].item() == steps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["frozen", "group_removed"])
def test_the_deleted_state_of_a_param_without_a_grad_is_freed_by_the_next_step(backend, how):
    """AdamW frees it at once. The slot that held it here let go only when the param stepped again,
    and never for a param whose group was removed (`opt.param_groups.pop()`, then its states
    deleted, as code that unfreezes layers in stages may do)."""
    p, frozen = (torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in (10, 12))
    opt = SNRAdamW([{"params": [p]}, {"params": [frozen]}], backend=backend)
    p.grad, frozen.grad = torch.randn(10, device=DEVICE), torch.randn(12, device=DEVICE)
    opt.step()
    old = [weakref.ref(t) for t in opt.state[frozen].values()]
    frozen.grad = None
    if how == "group_removed":
        opt.param_groups.pop()
    del opt.state[frozen]
    gc.disable()  # freed by reference counts, not by a later collection
    try:
        opt.step()
        assert all(ref() is None for ref in old)
    finally:
        gc.enable()
    assert frozen not in opt.state


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_state_dict_replaced_by_hand_is_adopted_like_adamws(backend):
    """opt.state replaced outright, as reset snippets do (`opt.state = defaultdict(dict)`), or
    restored from plain copies of its entries: AdamW starts afresh or resumes from them, and so
    do we. An entry set on the state object a user holds keeps that object the optimizer's."""
    from collections import defaultdict

    (ours, opt), (theirs, ref) = pair([(5,), (3,)], backend)
    gen = torch.Generator().manual_seed(8)

    def steps(k):
        random_steps(ours, opt, theirs, ref, gen, k)

    steps(2)
    for o in (opt, ref):
        o.state = defaultdict(dict)
    steps(2)
    assert_like_adamw(ours, opt, theirs, ref)
    assert opt.state[ours[0]]["step"].item() == 2
    saved = [{p: {k: v.clone() for k, v in o.state[p].items()} for p in ps} for o, ps in ((opt, ours), (ref, theirs))]
    steps(1)
    opt.state, ref.state = saved
    steps(2)
    assert_like_adamw(ours, opt, theirs, ref)
    assert opt.state[ours[0]]["step"].item() == 4
    held = opt.state
    held[ours[1]] = {}
    ref.state[theirs[1]] = {}
    steps(1)
    assert opt.state is held
    assert_like_adamw(ours, opt, theirs, ref)


def test_the_same_param_twice_is_refused():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="param 2 of param group 0 is the same tensor as param 0"):
        SNRAdamW([p, q, p])
    with pytest.raises(ValueError, match=r"param 1 \('w2'\) of param group 0 is the same tensor"):
        SNRAdamW([("w", p), ("w2", p)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_appended_twice_after_construction_is_refused_unchanged(backend):
    """The fused path used to count the step twice and launch once with t = 2 (-0.1743 against
    AdamW's -0.1999); on a GPU two programs would race on the same elements."""
    p, q = torch.nn.Parameter(torch.ones(3, device=DEVICE)), torch.nn.Parameter(torch.ones(2, device=DEVICE))
    opt = SNRAdamW([p, q], backend=backend)
    give([p, q], [torch.ones(3, device=DEVICE), torch.ones(2, device=DEVICE)])
    opt.step()
    opt.param_groups[0]["params"].append(p)
    before = snapshot([p, q], opt)
    with pytest.raises(ValueError) as e:
        opt.step()
    assert str(e.value) == ("param 2 of param group 0 appears twice in that group: each param may appear once "
                            "(it would be stepped twice)")
    assert_unchanged(before, [p, q], opt)
    opt.param_groups[0]["params"].pop()
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(4, device=DEVICE))]})
    opt.param_groups[1]["params"].append(q)  # in a second group too
    with pytest.raises(ValueError) as e:
        opt.step()
    assert str(e.value) == "param 1 of param group 1 is also in param group 0: a param may belong to one group only"
    assert_unchanged(before, [p, q], opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_put_in_place_of_an_earlier_one_is_refused_unchanged(backend):
    """[c, a, b] stepped, then group["params"][1] = b: b at index 2 still fits its slot, so only
    index 1 is checked in full, and there b comes first; one launch would step b twice. The
    message names b's shape, not c's."""
    (ours, opt), (theirs, ref) = pair([(2,), (3,), (3,)], backend)
    grads = [torch.full((2,), 1.0, device=DEVICE), torch.full((3,), 0.5, device=DEVICE),
             torch.full((3,), -2.0, device=DEVICE)]
    step_both(ours, opt, theirs, ref, grads)
    _, a, b = ours
    opt.param_groups[0]["params"][1] = b
    give(ours, grads)
    before = snapshot(ours, opt)
    with pytest.raises(ValueError) as e:
        opt.step()
    assert str(e.value) == ("a param of shape (3,) appears twice in param group 0: each param may appear once "
                            "(it would be stepped twice)")
    assert_unchanged(before, ours, opt)
    opt.param_groups[0]["params"][1] = a  # put back: steps on as AdamW does
    step_both(ours, opt, theirs, ref, grads)
    assert_like_adamw(ours, opt, theirs, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_moved_to_another_group_steps_with_its_lr_and_keeps_the_dict_users_hold(backend):
    """b moves from group 0 (lr 1e-2, beside a) to group 1 (lr 0.5, beside c): from then on it
    steps with group 1's lr, as AdamW does, its states carried over, and opt.state[b] stays the
    dict a user (or a trainer's logger) already holds, refilled with the new tensors."""
    (ours, opt), (theirs, ref) = pair([(4,), (4,), (4,)], backend)
    for o, (a, b, c) in ((opt, ours), (ref, theirs)):
        o.param_groups[0]["params"] = [a, b]
        o.add_param_group({"params": [c], "lr": 0.5})
    gen = torch.Generator().manual_seed(6)
    step_both(ours, opt, theirs, ref, [torch.randn(4, generator=gen).to(DEVICE) for _ in range(3)])
    held = opt.state[ours[1]]
    for o, (a, b, c) in ((opt, ours), (ref, theirs)):
        o.param_groups[0]["params"], o.param_groups[1]["params"] = [a], [c, b]
    for _ in range(2):
        step_both(ours, opt, theirs, ref, [torch.randn(4, generator=gen).to(DEVICE) for _ in range(3)])
    assert_like_adamw(ours, opt, theirs, ref)
    assert opt.state[ours[1]] is held and held["step"].item() == 3
    torch.testing.assert_close(held["exp_avg"], ref.state[theirs[1]]["exp_avg"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_moved_out_of_its_group_and_back_steps_like_adamw(backend):
    """d alone in group 1 moves to group 0 (group 1 left empty), steps, and moves back to its old
    place. Group 1's record of slots by position still held d's first slot, whose bucket had gone
    with the move, and the next step failed (AttributeError: 'NoneType' object has no attribute
    'checked'); found by the between-steps property test."""
    (ours, opt), (theirs, ref) = pair([(5,), (3, 4), (4,)], backend)
    for o, (a, b, d) in ((opt, ours), (ref, theirs)):
        o.param_groups[0]["params"] = [a, b]
        o.add_param_group({"params": [d], "lr": 5e-3})
    gen = torch.Generator().manual_seed(8)
    for moves in ([], [(1, 0)], [(0, 1)], [(1, 0)], [(0, 1)]):
        for src, dst in moves:
            for o, q in ((opt, ours[2]), (ref, theirs[2])):
                o.param_groups[src]["params"] = [p for p in o.param_groups[src]["params"] if p is not q]
                o.param_groups[dst]["params"].append(q)
        random_steps(ours, opt, theirs, ref, gen, 2)
        assert_like_adamw(ours, opt, theirs, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_reordered_with_their_params_swapped_step_with_each_groups_own_lr(backend):
    """Both at once: opt.param_groups reversed and the two groups' params swapped, so the group
    now first holds the params its index held before, under another lr. Each param must step with
    the lr of the group it is in now, as AdamW does."""
    (ours, opt), (theirs, ref) = pair([(4,), (4,)], backend)
    for o, ps in ((opt, ours), (ref, theirs)):
        o.param_groups[0]["params"] = [ps[0]]
        o.add_param_group({"params": [ps[1]], "lr": 0.5})
    gen = torch.Generator().manual_seed(3)
    step_both(ours, opt, theirs, ref, [torch.randn(4, generator=gen).to(DEVICE) for _ in range(2)])
    for o in (opt, ref):
        first, second = o.param_groups
        first["params"], second["params"] = second["params"], first["params"]
        o.param_groups[:] = [second, first]  # index 0: lr 0.5, holding param 0 again
    for _ in range(2):
        step_both(ours, opt, theirs, ref, [torch.randn(4, generator=gen).to(DEVICE) for _ in range(2)])
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["params"][0] is ours[0]
    assert_like_adamw(ours, opt, theirs, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rho_zero_forgets_an_s_past_float32(backend):
    """rho = 0: s_t = (g - m)^2 whatever s_{t-1} was. With |g| = 3e19 that square passes float32's
    range (s = inf), and rho * s = 0 * inf would make every later s NaN; s must be this step's
    square again. Gate snr with softness 0 (s-hat's weight 0): the params match the float64
    reference, where nothing overflows, and s is finite once the grads are small."""
    gen = torch.Generator().manual_seed(6)
    theta = torch.randn(64, generator=gen)
    grads = [torch.randn(64, generator=gen).sign() * scale for scale in (3e19, 3e19, 1.0, 1.0)]
    hp = dict(lr=1e-2, betas=(0.9, 0.999), rho=0.0, eps=1e-8, weight_decay=0.0, gate="snr", alpha=1.0,
              softness=0.0, gate_eps=1e-16, warmup_steps=0, maximize=False)
    p, opt, ref_theta = step_beside_reference(theta, grads, backend, hp)
    s = opt.state[p]["exp_grad_var"]
    assert torch.isfinite(s).all()  # (g4 - m3)^2: m3 is about 3e18, finite squared times 1
    torch.testing.assert_close(p.detach().cpu().double(), ref_theta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["snr", "soft", "hard", "none"])
@pytest.mark.parametrize("scales", [(3e19, 3e19, 1e19, 1.0), (1e-42, 5e-43, 1e-42, 1.0)], ids=["large", "subnormal"])
def test_extreme_finite_grads_keep_params_finite_and_match_the_reference(backend, gate, scales):
    """|g| = 3e19: m-hat^2 and alpha*s-hat overflow float32 (the old gates gave inf/inf = NaN on
    every backend). |g| = 1e-42, subnormal: m is too and v, s underflow to 0; 1/max(|m|, ...)
    overflowed in the eager backend's gate and 0 * inf made every such param NaN. The float64
    reference does neither; the backends must match it."""
    gen = torch.Generator().manual_seed(5)
    theta = torch.randn(64, generator=gen)
    grads = [torch.randn(64, generator=gen).sign() * scale for scale in scales]
    hp = dict(lr=1e-2, betas=(0.9, 0.999), rho=0.99, eps=1e-8, weight_decay=0.1, gate=gate, alpha=1.0,
              softness=1.0, gate_eps=1e-16, warmup_steps=0, maximize=False)
    p, _, ref_theta = step_beside_reference(theta, grads, backend, hp)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.detach().cpu().double(), ref_theta, rtol=1e-5, atol=1e-6)


def test_gates_stay_finite_where_the_naive_form_overflows():
    """The float64 reference's q for an m-hat of 3e19 (float32's m-hat^2 is inf) against each
    backend's, through one step with warmup closed and weight decay off: theta moves by lr*q*sign."""
    from snr_triton.reference import gate_q

    m = torch.tensor([3e19, -3e19, 1e-30, 0.0, 2.0, 1.0])  # 1.0: the scale c is exactly 1
    for backend in BACKENDS:
        for gate in ("snr", "soft", "hard"):
            p = torch.nn.Parameter(torch.zeros(6, device=DEVICE))
            opt = SNRAdamW([p], lr=1.0, betas=(0.0, 0.99), rho=0.5, weight_decay=0.0, eps=1e-30, gate=gate,
                           alpha=0.5, backend=backend)
            p.grad = m.to(DEVICE)
            opt.step()  # t = 1: s-hat := m-hat^2
            q = gate_q(m.double(), m.double() ** 2, gate=gate, alpha=0.5, softness=1.0, gate_eps=1e-16)
            assert torch.isfinite(p).all(), (backend, gate)
            torch.testing.assert_close(-p.detach().cpu().double(), q * m.double().sign(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate,alpha", [("snr", 0.0), ("soft", 0.0), ("soft", 1.0)])
def test_a_zero_signal_under_large_noise_with_softness_zero_closes_the_gate(backend, gate, alpha):
    """m = 0 (beta1 = 0, a zero grad) under s ~ 1e34 with softness 0 (and alpha 0 or 1): every
    term of the gate's denominator is 0 or below float32's range once scaled, so a naive 0/0
    gives NaN. The float64 reference's q is 0: the param only decays."""
    hp = dict(lr=1e-2, betas=(0.0, 0.99), rho=0.99, eps=1e-8, weight_decay=0.1, gate=gate, alpha=alpha,
              softness=0.0, gate_eps=1e-16, warmup_steps=0, maximize=False)
    theta = torch.linspace(-1.0, 1.0, 8)
    p, _, ref_theta = step_beside_reference(theta, (torch.full((8,), 1e18), torch.zeros(8)), backend, hp)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.detach().cpu().double(), ref_theta, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha,softness", [(0.0, 1.0), (0.25, 2.0)])
def test_the_soft_gate_with_softness_above_alpha_keeps_its_noise_term(backend, alpha, softness):
    """soft: q = d / (d + lambda*s-hat + delta), d = max(m-hat^2 - alpha*s-hat, 0). The overflow-safe
    form scales s-hat by the larger of alpha and lambda; scaled by alpha (0 here), the noise term
    would vanish and the gate open (q = 1) on pure noise. Three steps of random grads."""
    hp = dict(lr=1e-2, betas=(0.9, 0.999), rho=0.9, eps=1e-8, weight_decay=0.0, gate="soft", alpha=alpha,
              softness=softness, gate_eps=1e-16, warmup_steps=0, maximize=False)
    gen = torch.Generator().manual_seed(11)
    theta = torch.randn(64, generator=gen)
    grads = [torch.randn(64, generator=gen) for _ in range(3)]
    p, _, ref_theta = step_beside_reference(theta, grads, backend, hp)
    adamw = step_beside_reference(theta, grads, backend, dict(hp, gate="none"))[2]
    assert (ref_theta - theta.double()).abs().sum() < 0.9 * (adamw - theta.double()).abs().sum()  # the gate shuts
    torch.testing.assert_close(p.detach().cpu().double(), ref_theta, rtol=1e-5, atol=1e-7)


def test_adamws_positional_arguments_mean_the_same():
    """SNRAdamW(params, 1e-3, (0.9, 0.999), 1e-8, 0.1) used to set rho = 1e-8 and eps = 0.1."""
    p = torch.nn.Parameter(torch.ones(3))
    group = SNRAdamW([p], 1e-3, (0.9, 0.95), 1e-7, 0.1).param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"], group["rho"]) == \
        (1e-3, (0.9, 0.95), 1e-7, 0.1, 0.99)
    with pytest.raises(TypeError):
        SNRAdamW([p], 1e-3, (0.9, 0.999), 1e-8, 0.1, False)  # AdamW's amsgrad: keyword-only here


@pytest.mark.parametrize("kw,pattern", [
    (dict(betas=(0.9, torch.tensor(0.999))), "betas must be both floats or both tensors"),
    (dict(lr=torch.tensor(-1.0)), "lr must be in"),
    (dict(lr=torch.tensor(float("nan"))), "lr must be a real number"),
    (dict(betas=(torch.tensor(1.0), torch.tensor(0.9))), r"betas\[0\]"),
])
def test_what_adamw_refuses_is_refused(kw, pattern):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError):
        torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], **kw)  # the truth: AdamW refuses it too
    with pytest.raises(ValueError, match=pattern):
        SNRAdamW([p], **kw)


SCHEDULERS_THAT_CYCLE_BETA1 = {
    "one_cycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=12),
    "cyclic": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=0.05, step_size_up=3,
                                                          base_momentum=0.8, max_momentum=0.95),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tensor_betas", [False, True], ids=["float_betas", "tensor_betas"])
@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS_THAT_CYCLE_BETA1))
def test_schedulers_that_cycle_beta1_step_like_adamw(backend, tensor_betas, scheduler):
    """OneCycleLR and CyclicLR write a float beta1 beside the group's beta2 every step; with tensor
    betas that makes (float, tensor), which AdamW steps with and SNRAdamW refused mid-run. The
    checkpoint taken then loads too."""
    betas = (torch.tensor(0.9), torch.tensor(0.99)) if tensor_betas else (0.9, 0.99)
    hp = dict(HP, betas=betas)
    gen = torch.Generator().manual_seed(5)
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in [(5,), (3, 4)]]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = SNRAdamW(ours, gate="none", backend=backend, **hp)
    ref = torch.optim.AdamW(theirs, **hp, foreach=False)  # on a GPU foreach AdamW refuses tensor betas
    schedules = [SCHEDULERS_THAT_CYCLE_BETA1[scheduler](o) for o in (opt, ref)]
    for _ in range(6):
        random_steps(ours, opt, theirs, ref, gen, 1)
        for schedule in schedules:
            schedule.step()
        assert_like_adamw(ours, opt, theirs, ref)
    assert isinstance(opt.param_groups[0]["betas"][0], float)
    assert opt.param_groups[0]["betas"] == ref.param_groups[0]["betas"]
    resumed = SNRAdamW(ours, gate="none", backend=backend, **hp)
    resumed.load_state_dict(opt.state_dict())
    random_steps(ours, resumed, theirs, ref, gen, 2)
    assert_like_adamw(ours, resumed, theirs, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_betas_changed_in_place_between_steps_step_like_adamw(backend):
    """A step validates a group once per distinct set of plain values; tensor betas are read
    afresh every step, so values written into them in place (as a scheduler keeping tensors does)
    count at the next step, as with AdamW."""
    betas = (torch.tensor(0.9), torch.tensor(0.99))
    gen = torch.Generator().manual_seed(6)
    ours = [torch.nn.Parameter(torch.randn(5, generator=gen).to(DEVICE))]
    theirs = [torch.nn.Parameter(ours[0].detach().clone())]
    opt = SNRAdamW(ours, gate="none", backend=backend, **dict(HP, betas=tuple(b.clone() for b in betas)))
    ref = torch.optim.AdamW(theirs, **dict(HP, betas=betas), foreach=False)
    for lr in (1e-2, 3e-2):  # a float lr set by assignment, then the betas changed in place
        for o in (opt, ref):
            o.param_groups[0]["lr"] = lr
        random_steps(ours, opt, theirs, ref, gen, 2)
        for o in (opt, ref):
            o.param_groups[0]["betas"][0].mul_(0.6)
            o.param_groups[0]["betas"][1].mul_(0.95)
        random_steps(ours, opt, theirs, ref, gen, 2)
        assert_like_adamw(ours, opt, theirs, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_betas_are_read_once_per_group_and_step(backend, monkeypatch):
    p = torch.nn.Parameter(torch.ones(4, device=DEVICE))
    opt = SNRAdamW([p], betas=(torch.tensor(0.9), torch.tensor(0.99)), backend=backend)
    p.grad = torch.ones(4, device=DEVICE)
    opt.step()
    reads = []
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: (reads.append(_n), _o(self, *a))[1])
    p.grad = torch.ones(4, device=DEVICE)
    opt.step()
    monkeypatch.undo()
    assert len(reads) <= 1, reads  # was 4 (two reads of each beta)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_hooks_run_in_torchs_order(backend):
    """A pre-hook that repairs a checkpoint runs before the checks; a post-hook sees tensors."""
    p = torch.nn.Parameter(torch.ones(4, device=DEVICE))
    opt = SNRAdamW([p], backend=backend)
    p.grad = torch.ones(4, device=DEVICE)
    opt.step()
    saved = opt.state_dict()
    broken = copy.deepcopy(saved)
    broken["state"][0]["second_moment"] = broken["state"][0].pop("exp_avg_sq")  # a renamed key

    def repair(optimizer, state_dict):
        st_ = state_dict["state"][0]
        st_["exp_avg_sq"] = st_.pop("second_moment")
        return state_dict

    seen = []
    twin = SNRAdamW([torch.nn.Parameter(torch.ones(4, device=DEVICE))], backend=backend)
    twin.register_load_state_dict_pre_hook(repair)
    twin.register_load_state_dict_post_hook(lambda o: seen.append(
        {k: v.sum().item() for k, v in o.state[o.param_groups[0]["params"][0]].items()}))
    twin.load_state_dict(broken)
    q = twin.param_groups[0]["params"][0]
    assert seen == [{k: v.sum().item() for k, v in opt.state[p].items()}]
    for k in ("step", "exp_avg", "exp_avg_sq", "exp_grad_var"):
        assert torch.equal(twin.state[q][k], opt.state[p][k])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
def test_fresh_grads_refresh_addresses_only(backend):
    """zero_grad(set_to_none=True), torch's default, brings new grad storages every step: the old
    table was rebuilt every time (a Python list per 1,024 elements and three copies to the device).
    Now the block map is built once per active set and only the address columns are refreshed."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(DEVICE)
    opt = SNRAdamW(model.parameters(), backend=backend, track_stats=True)
    x = torch.randn(4, 6, device=DEVICE)
    before = dict(tables.counters)
    for _ in range(20):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    grown = {k: tables.counters[k] - before[k] for k in before}
    assert grown["maps_built"] == 1 and grown["stand_in_copies"] == 0
    assert grown["addresses_refreshed"] <= 20
    # params active on alternate steps: one map per active set, not one rebuild per step
    before = dict(tables.counters)
    for k in range(20):
        opt.zero_grad()
        model(x).square().mean().backward()
        if k % 2:
            model[0].weight.grad = None
        opt.step()
    assert tables.counters["maps_built"] - before["maps_built"] == 1  # the all-active map is kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_joining_param_copies_no_other_state_and_reads_nothing(backend, monkeypatch):
    """An MoE expert getting its first tokens, an adapter added mid-run: it gets states of its own;
    the others keep theirs (same tensors, same memory), and no step count is read on the host."""
    (ours, opt), (theirs, ref) = pair([(50,), (7,)], backend)
    give(ours, [torch.ones(50, device=DEVICE), None])
    give(theirs, [torch.ones(50, device=DEVICE), None])
    opt.step()
    ref.step()
    kept = {k: opt.state[ours[0]][k] for k in KEYS}
    addresses = {k: v.data_ptr() for k, v in kept.items()}
    reads = []
    original = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: (reads.append(1), original(self))[1])
    give(ours, [torch.ones(50, device=DEVICE), torch.ones(7, device=DEVICE)])
    opt.step()
    monkeypatch.undo()
    assert reads == []
    give(theirs, [torch.ones(50, device=DEVICE), torch.ones(7, device=DEVICE)])
    ref.step()
    for k in KEYS:
        assert opt.state[ours[0]][k] is kept[k] and kept[k].data_ptr() == addresses[k]
    assert_like_adamw(ours, opt, theirs, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saving_one_params_state_writes_that_state(backend):
    """torch.save(opt.state[p]) for a 10-element param wrote the whole bucket (48 MB) when states
    were views of one flat buffer."""
    big, small = torch.nn.Parameter(torch.zeros(1 << 20, device=DEVICE)), torch.nn.Parameter(torch.zeros(10, device=DEVICE))
    opt = SNRAdamW([big, small], backend=backend)
    give([big, small], [torch.ones_like(big), torch.ones_like(small)])
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state[small], buffer)
    assert buffer.tell() < 8_000  # 3 x 40 B of states, the step counters (4 B per param), pickling
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    assert buffer.tell() < 3 * 4 * (1 << 20) + 50_000


# ----------------------------------------------------------------- a property: anything users do

ACTIONS = st.sampled_from(["step", "resize", "new_data", "replace_state", "delete_state", "no_grad",
                           "requires_grad_off", "add_group", "relayout", "replace_entry", "clear_state",
                           "lr_change", "grads_in_place", "reload", "move_group"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_grad_norm", [None, 0.5], ids=["unclipped", "clipped"])  # grads' norm: about 4
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(st.tuples(ACTIONS, st.integers(0, 4)), min_size=3, max_size=12), seed=st.integers(0, 2**16))
def test_whatever_users_do_between_steps_steps_like_adamw(backend, max_grad_norm, actions, seed):
    """With max_grad_norm, like torch's clip_grad_norm_ then AdamW: the norm is over exactly the
    grads the step uses, whichever params lost their grads, joined late or were resized. A long
    run of this test found a frozen param's deleted state stepping on when the param trained
    again (test_states_reset_by_hand_start_afresh[frozen-...] keeps it); with each
    action's param drawn, not taken in turn, these 20 examples find it in some of the six cases."""
    gen = torch.Generator().manual_seed(seed)
    (ours, opt), (theirs, ref) = pair([(5,), (3, 4), (6,)], backend, seed=seed, max_grad_norm=max_grad_norm)
    extra, in_place = 0, False
    for k, (action, target) in enumerate(actions + [("step", 0)]):
        target %= len(ours)
        a, b = ours[target], theirs[target]
        if action == "resize":  # AdamW cannot go on without a fresh state: reset it as a user must
            n = int(torch.randint(1, 9, (1,), generator=gen))
            fresh = torch.randn(n, generator=gen).to(DEVICE)
            a.data, b.data = fresh.clone(), fresh.clone()
            opt.state.pop(a, None)
            ref.state.pop(b, None)
        elif action == "new_data":
            fresh = torch.randn(a.shape, generator=gen).to(DEVICE)
            a.data, b.data = fresh.clone(), fresh.clone()
        elif action == "relayout" and a.dim() == 2:
            a.data, b.data = a.data.t().contiguous().t(), b.data.t().contiguous().t()
        elif action == "replace_state" and a in opt.state and opt.state[a]:
            value = torch.randn(a.shape, generator=gen).to(DEVICE).abs()
            opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"] = value.clone(), value.clone()
        elif action == "delete_state":
            opt.state.pop(a, None)
            ref.state.pop(b, None)
        elif action == "requires_grad_off":
            a.requires_grad_(not a.requires_grad)
            b.requires_grad_(not b.requires_grad)
        elif action == "add_group" and extra < 2:
            extra += 1
            fresh = torch.randn(4, generator=gen).to(DEVICE)
            ours.append(torch.nn.Parameter(fresh.clone()))
            theirs.append(torch.nn.Parameter(fresh.clone()))
            opt.add_param_group({"params": [ours[-1]], "lr": 5e-3})
            ref.add_param_group({"params": [theirs[-1]], "lr": 5e-3})
        elif action == "replace_entry" and b in ref.state and ref.state[b]:  # a new dict, AdamW's keys
            entry = {key: value.clone() for key, value in ref.state[b].items()}
            entry["exp_avg"] = torch.randn(a.shape, generator=gen).to(DEVICE)
            opt.state[a], ref.state[b] = {key: value.clone() for key, value in entry.items()}, entry
        elif action == "clear_state":
            opt.state.clear()
            ref.state.clear()
        elif action == "lr_change":
            for o in (opt, ref):
                o.param_groups[k % len(o.param_groups)]["lr"] *= 0.5
        elif action == "grads_in_place":
            in_place = not in_place
        elif action == "reload":  # a checkpoint round trip, as a resumed run does
            for o in (opt, ref):
                buffer = io.BytesIO()
                torch.save(o.state_dict(), buffer)
                buffer.seek(0)
                o.load_state_dict(torch.load(buffer, weights_only=True))
        elif action == "move_group" and len(opt.param_groups) > 1:
            src = next(gi for gi, group in enumerate(opt.param_groups) if any(p is a for p in group["params"]))
            for o, q in ((opt, a), (ref, b)):
                o.param_groups[src]["params"] = [p for p in o.param_groups[src]["params"] if p is not q]
                o.param_groups[(src + 1) % len(o.param_groups)]["params"].append(q)
        grads = [None if (action == "no_grad" and i == target) or not p.requires_grad
                 else torch.randn(p.shape, generator=gen).to(DEVICE) for i, p in enumerate(ours)]
        step_both(ours, opt, theirs, ref, grads, max_grad_norm, in_place)
        assert_like_adamw(ours, opt, theirs, ref)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
def test_the_most_used_active_set_keeps_its_map_while_others_come_and_go(backend):
    """MoE experts or frozen layers: the all-active set every other step, and between them more
    other active sets than the bucket keeps maps. The least recently used map goes, so the
    all-active one is built once (evicting the most recent one instead rebuilt it every time)."""
    n = MAPS_KEPT + 2
    params = [torch.nn.Parameter(torch.randn(3, device=DEVICE)) for _ in range(n)]
    opt = SNRAdamW(params, backend=backend, **HP)
    before = dict(tables.counters)
    for k in range(n):
        for skip in (None, k):  # all active, then all but param k
            give(params, [None if i == skip else torch.ones(3, device=DEVICE) for i in range(n)])
            opt.step()
    assert tables.counters["maps_built"] - before["maps_built"] == 1 + n


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_active_set_every_step_keeps_what_the_step_remembers_bounded(backend):
    """MoE routing: a different subset of experts gets grads each step, so nearly every step's
    active set is new. What a bucket remembers per active set (block maps, the duplicate check)
    stays within MAPS_KEPT entries (the duplicate check's set used to grow by one tuple of indices
    per step), and every step is still AdamW's."""
    n = 10
    (ours, opt), (theirs, ref) = pair([(3,)] * n, backend)
    gen = torch.Generator().manual_seed(9)
    for _ in range(3 * MAPS_KEPT):
        active = torch.randperm(n, generator=gen)[: n // 2].tolist()
        step_both(ours, opt, theirs, ref,
                  [torch.randn(3, generator=gen).to(DEVICE) if i in active else None for i in range(n)])
    assert_like_adamw(ours, opt, theirs, ref)
    (bucket,) = opt._buckets.values()
    assert len(bucket.checked) <= MAPS_KEPT and len(bucket.maps) <= MAPS_KEPT


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_odd_layouts_step_bit_for_bit_like_dense_twins(backend, dtype):
    """A non-dense param and a grad laid out otherwise than its param are stepped through
    stand-ins, which must have the param's dtype (the kernel reads them as the bucket's): the same
    as dense twins with the same grads, bit for bit."""
    gen = torch.Generator().manual_seed(4)
    odd = [torch.nn.Parameter(torch.randn(6, 8, generator=gen).to(DEVICE, dtype)[:, :5]),
           torch.nn.Parameter(torch.randn(4, 3, generator=gen).to(DEVICE, dtype))]
    twins = [torch.nn.Parameter(p.detach().clone().contiguous()) for p in odd]
    start = [p.detach().clone() for p in twins]
    a, b = SNRAdamW(odd, backend=backend, **HP), SNRAdamW(twins, backend=backend, **HP)
    assert not odd[0].is_contiguous()
    for _ in range(4):
        g0 = torch.randn(6, 5, generator=gen).to(DEVICE, dtype)
        g1 = torch.randn(3, 4, generator=gen).to(DEVICE, dtype).t()  # strides (1, 4), the param's (3, 1)
        give(odd, [g0, g1])
        give(twins, [g0, g1.contiguous()])
        a.step()
        b.step()
    for p, q, p0 in zip(odd, twins, start):
        assert torch.equal(p.detach(), q.detach()) and not torch.equal(q.detach(), p0)
        for k, v in b.state[q].items():
            assert torch.equal(a.state[p][k], v), k


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
def test_odd_layouts_copy_into_kept_stand_ins_without_rebuilding(backend):
    """A non-dense param (a column slice) and a grad with other strides than its param: the old
    path made fresh stand-ins and rebuilt the table every step. Now the stand-ins are kept with
    the param's states, so their addresses (and the block map) stay put."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(6, 8, generator=gen).to(DEVICE)
    ours = [torch.nn.Parameter(base.clone()[:, :5]), torch.nn.Parameter(torch.randn(4, 3, generator=gen).to(DEVICE))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = SNRAdamW(ours, gate="none", backend=backend, **HP)
    ref = torch.optim.AdamW(theirs, **HP)
    assert not ours[0].is_contiguous()
    before = dict(tables.counters)
    for k in range(6):
        gs = [torch.randn(6, 5, generator=gen).to(DEVICE), torch.randn(3, 4, generator=gen).to(DEVICE).t()]
        step_both(ours, opt, theirs, ref, gs)
    assert tables.counters["maps_built"] - before["maps_built"] == 1
    assert tables.counters["addresses_refreshed"] - before["addresses_refreshed"] == 1
    assert tables.counters["stand_in_copies"] - before["stand_in_copies"] == 12  # 2 per step
    assert_like_adamw(ours, opt, theirs, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["snr", "soft", "hard", "none"])
@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_grads_at_float32s_limit_keep_params_finite_like_adamw(backend, gate, beta1):
    """|g| = 3e38: v and s overflow float32 (inf), so AdamW's update is m / inf = 0 and only the
    weight decay moves the param. The gate must stay finite where s is inf (q = 0, not inf/inf):
    else q * 0 = NaN. Against AdamW's rule (and AdamW itself for gate="none"). beta1 = 0 puts m
    itself at float32's limit (|m| > 2^127)."""
    hp = dict(HP, betas=(beta1, HP["betas"][1]))
    gen = torch.Generator().manual_seed(7)
    init = torch.randn(16, generator=gen)
    grads = [torch.randn(16, generator=gen), torch.randn(16, generator=gen)]
    grads[1][3] = 3e38
    grads[1][5] = -3e38
    p = torch.nn.Parameter(init.clone().to(DEVICE))
    q = torch.nn.Parameter(init.clone().to(DEVICE))
    opt = SNRAdamW([p], gate=gate, backend=backend, **hp)
    ref = torch.optim.AdamW([q], **hp)
    after_one = None
    for g in grads:
        p.grad, q.grad = g.clone().to(DEVICE), g.clone().to(DEVICE)
        opt.step()
        ref.step()
        after_one = p.detach().clone() if after_one is None else after_one
    assert torch.isfinite(p).all() and torch.isfinite(q).all()
    decay = 1 - hp["lr"] * hp["weight_decay"]
    for i in (3, 5):  # at step 2 the update is m / inf = 0: the decay alone, as AdamW's
        assert p[i].item() == pytest.approx(after_one[i].item() * decay, rel=1e-6)
    if gate == "none":
        same(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_resized_after_its_grad_was_given_is_refused(backend):
    """p.grad assigned (16 elements), then p.data resized to 48: the grad still has the shape the
    states were made for, the param does not. AdamW refuses; so do we, with nothing changed."""
    (ours, opt), (theirs, ref) = pair([(16,), (16,)], backend)
    step_both(ours, opt, theirs, ref, [torch.ones(16, device=DEVICE)] * 2)
    for params in (ours, theirs):
        give(params, [torch.ones(16, device=DEVICE)] * 2)
        params[0].data = torch.zeros(48, device=DEVICE)
    with pytest.raises(RuntimeError):
        ref.step()
    before = snapshot(ours, opt)
    with pytest.raises(RuntimeError, match=r"grad does not match its param \(param 0 of param group 0\)"):
        opt.step()
    assert_unchanged(before, ours, opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bucket_growing_past_its_first_step_counters_steps_like_adamw(backend):
    """A bucket's step counters are one tensor, made for 16 params and doubled as more join:
    params whose first grad comes after others have stepped grow it (twice here, to 64), and the
    entry a user holds keeps showing its param's live counter."""
    n = 40
    (ours, opt), (theirs, ref) = pair([(3,)] * n, backend)
    gen = torch.Generator().manual_seed(5)
    held = None
    for k in range(5):
        active = 10 if k < 2 else n
        if k == 2:  # a state replaced by hand just before the step that grows the counters: adopted
            for o, params in ((opt, ours), (ref, theirs)):
                o.state[params[3]]["exp_avg"] = torch.full((3,), 0.5, device=DEVICE)
                o.state[params[7]]["exp_avg_sq"] = torch.full((3,), 2.0, device=DEVICE)
        step_both(ours, opt, theirs, ref,
                  [torch.randn(3, generator=gen).to(DEVICE) if i < active else None for i in range(n)])
        if k == 0:
            held = opt.state[ours[0]]
    assert opt.state[ours[0]] is held and held["step"].item() == 5
    assert opt.state[ours[-1]]["step"].item() == 3
    assert_like_adamw(ours, opt, theirs, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.uint8], ids=["fp32_states", "8bit_states"])
def test_a_float64_default_dtype_changes_no_step(backend, state_dtype):
    """Scientific code sets torch.set_default_dtype(torch.float64); the optimizer's own buffers
    (step counters, grown ones too, and 8-bit scales) must not follow it. The truth: the same run
    under the float32 default, bit for bit."""

    def run():
        gen = torch.Generator().manual_seed(6)
        params = [torch.nn.Parameter(torch.randn(300, generator=gen, dtype=torch.float32).to(DEVICE))
                  for _ in range(20)]
        opt = SNRAdamW(params, lr=1e-2, alpha=0.7, state_dtype=state_dtype, backend=backend)
        for k in range(3):
            for i, p in enumerate(params):
                g = torch.randn(300, generator=gen, dtype=torch.float32).to(DEVICE)
                p.grad = g if k or i < 8 else None  # 12 join at the second step: the counters grow
            opt.step()
        return [p.detach().clone() for p in params], [opt.decoded_state(p) for p in params]

    want = run()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = run()
    finally:
        torch.set_default_dtype(before)
    for a, b in zip(got[0], want[0]):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    for i, (mine, truth) in enumerate(zip(*(got[1], want[1]))):
        assert mine.keys() == truth.keys()
        for key, value in truth.items():
            assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), (i, key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["update_dict", "update_kwargs", "ior", "setdefault"])
def test_state_entries_written_through_dict_methods_are_adopted(backend, how):
    """Every way of writing a dict counts as a write of the state: update() with a dict or with
    keywords, |=, and setdefault(), which returns the value held (or, for a key deleted first,
    the one given, which the next step adopts). AdamW gets the same writes."""
    (ours, opt), (theirs, ref) = pair([(6,), (4,)], backend)
    gen = torch.Generator().manual_seed(7)

    def steps(k):
        random_steps(ours, opt, theirs, ref, gen, k)

    steps(2)
    for o, params in ((opt, ours), (ref, theirs)):
        entry = o.state[params[0]]
        new = torch.full_like(params[0], 0.25)
        if how == "update_dict":
            entry.update({"exp_avg": new})
        elif how == "update_kwargs":
            entry.update(exp_avg=new)
        elif how == "ior":
            entry |= {"exp_avg": new}
            assert o.state[params[0]] is entry
        else:
            held = entry["exp_avg_sq"]
            assert entry.setdefault("exp_avg_sq", torch.zeros_like(new)) is held
            del entry["exp_avg"]
            assert entry.setdefault("exp_avg", new) is new
        assert o.state[params[0]]["exp_avg"] is new
    assert set(opt.state[ours[0]]) == {"step", *KEYS, "exp_grad_var"}
    steps(2)
    assert_like_adamw(ours, opt, theirs, ref)
