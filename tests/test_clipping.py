"""max_grad_norm: clipping inside the step, against torch.nn.utils.clip_grad_norm_ as the truth.

A twin with the same init and grads is clipped by torch and then stepped by a plain SNRAdamW;
ours clips inside its step. Equal params and states to float32 rounding, on every backend.
"""

import copy
import logging
import math
import subprocess
import sys

import pytest
import torch

from conftest import BACKENDS, DEVICE, TRITON, dtypes_served
from snr_triton import SNRAdamW
from snr_triton.check import DTYPES

HP = dict(lr=1e-2, alpha=0.5, weight_decay=0.05)


def models(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(DEVICE, dtype)
    return model, copy.deepcopy(model)


def groups(model):
    first, *rest = list(model.parameters())
    return [{"params": [first]}, {"params": rest, "lr": 5e-3, "gate": "soft"}]


def backward(model, k, scaler=None, zero=False):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(16, 12, generator=gen).to(DEVICE, next(model.parameters()).dtype)
    model.zero_grad()
    loss = model(x).float().square().mean()
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if zero:
        for p in model.parameters():
            p.grad.zero_()


def close(a, b, dtype):
    tol = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [0.05, 1e3])  # clipping active; inactive (k = 1)
def test_equals_clip_grad_norm_then_step(backend, max_norm):
    model, twin = models()
    ours = SNRAdamW(groups(model), backend=backend, max_grad_norm=max_norm, **HP)
    theirs = SNRAdamW(groups(twin), backend=backend, **HP)
    for k in range(5):
        for m in (model, twin):
            backward(m, k, zero=(k == 3))  # zero grads: N = 0, k = 1
        expected = torch.nn.utils.get_total_norm([p.grad for p in twin.parameters()])
        torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm)
        grads_before = [p.grad.clone() for p in model.parameters()]
        ours.step()
        theirs.step()
        torch.testing.assert_close(ours.last_grad_norm(), expected, rtol=1e-6, atol=1e-7)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads_before))  # grads untouched
    for a, b in zip(model.parameters(), twin.parameters()):
        close(a, b, torch.float32)
        for key in ("exp_avg", "exp_avg_sq", "exp_grad_var", "step"):
            close(ours.state[a][key], theirs.state[b][key], torch.float32)


NARROW = [(b, d) for b in BACKENDS for d in ("bf16", "fp16") if d in dtypes_served(b)]


@pytest.mark.parametrize("backend,dtype", NARROW)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32_states", "bf16_states"])
def test_narrow_params(backend, dtype, state_dtype):
    """bf16 / fp16 params, fp32 states and bf16 ones (AdamW's for bf16 params: the bench's
    like-for-like row)."""
    model, twin = models(DTYPES[dtype])
    ours = SNRAdamW(model.parameters(), backend=backend, max_grad_norm=0.05, state_dtype=state_dtype, **HP)
    theirs = SNRAdamW(twin.parameters(), backend=backend, state_dtype=state_dtype, **HP)
    for k in range(3):
        for m in (model, twin):
            backward(m, k)
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05)
        ours.step()
        theirs.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        close(a, b, DTYPES[dtype])
        for key in ("exp_avg", "exp_avg_sq", "exp_grad_var"):
            assert ours.state[a][key].dtype == state_dtype
            close(ours.state[a][key], theirs.state[b][key], DTYPES[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_grad_scaler_equals_the_unscale_clip_step_recipe(backend):
    model, twin = models()
    ours = SNRAdamW(model.parameters(), backend=backend, max_grad_norm=0.05, **HP)
    theirs = SNRAdamW(twin.parameters(), backend=backend, **HP)
    scalers = [torch.amp.GradScaler(DEVICE, init_scale=2.0**10) for _ in range(2)]
    for k in range(4):
        for m, scaler in zip((model, twin), scalers):
            backward(m, k, scaler)
        scalers[0].step(ours)
        scalers[1].unscale_(theirs)
        expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05)
        scalers[1].step(theirs)
        for s in scalers:
            s.update()
        torch.testing.assert_close(ours.last_grad_norm(), expected, rtol=1e-6, atol=1e-7)
    for a, b in zip(model.parameters(), twin.parameters()):
        close(a, b, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_norm_skips_the_step(backend, bad):
    model, _ = models()
    opt = SNRAdamW(model.parameters(), backend=backend, max_grad_norm=1.0, track_stats=True, **HP)
    backward(model, 0)
    opt.step()
    before = copy.deepcopy(([p.detach().clone() for p in model.parameters()],
                            {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(model.parameters())}))
    backward(model, 1)
    next(model.parameters()).grad.view(-1)[3] = bad
    opt.step()
    for i, p in enumerate(model.parameters()):
        assert torch.equal(p.detach(), before[0][i])
        for k, v in before[1][i].items():
            assert torch.equal(opt.state[p][k], v), k
    assert not math.isfinite(opt.last_grad_norm().item())
    stats = opt.stats()
    assert stats["skipped_steps"] == 1 and math.isnan(stats["mean_gate"])
    opt.step()  # the same bad grad again, then a good one: skipped steps are counted over steps
    assert opt.stats()["skipped_steps"] == 2
    backward(model, 2)
    opt.step()
    assert opt.stats()["skipped_steps"] == 2 and opt.stats()["mean_gate"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_coefficient_at_a_norm_near_clip_grad_norm_s_epsilon(backend):
    """k = c / (N + 1e-6): at N = 2e-6 the 1e-6 decides k (1/3 here; c / (N - 1e-6) would be 1)."""
    ours, theirs = torch.nn.Parameter(torch.ones(4, device=DEVICE)), torch.nn.Parameter(torch.ones(4, device=DEVICE))
    a = SNRAdamW([ours], backend=backend, max_grad_norm=1e-6, gate="none", lr=1e-2)
    b = SNRAdamW([theirs], backend=backend, gate="none", lr=1e-2)
    grad = torch.full((4,), 1e-6, device=DEVICE)  # N = 2e-6
    for _ in range(3):
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        assert torch.nn.utils.clip_grad_norm_([theirs], 1e-6).item() == pytest.approx(2e-6)
        a.step()
        b.step()
        torch.testing.assert_close(a.state[ours]["exp_avg"], b.state[theirs]["exp_avg"], rtol=1e-6, atol=0)
    torch.testing.assert_close(a.state[ours]["exp_avg"], torch.full((4,), (1 - 0.9 ** 3) * 1e-6 / 3, device=DEVICE),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_skips_a_clipping_step_whose_grads_are_finite(backend):
    """found_inf passed to step (as GradScaler does, e.g. for an inf it found elsewhere) skips the
    step even though this optimizer's grads, and so its norm, are finite."""
    model, _ = models()
    opt = SNRAdamW(model.parameters(), backend=backend, max_grad_norm=1.0, **HP)
    backward(model, 0)
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    for bad in (None, float("inf")):  # finite grads; an inf that GradScaler found (so N is inf too)
        backward(model, 1)
        if bad is not None:
            next(model.parameters()).grad.view(-1)[0] = bad
        opt.step(found_inf=torch.tensor(1.0, device=DEVICE))
        for p, b, st in zip(model.parameters(), before, states):
            assert torch.equal(p.detach(), b)
            assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())
        assert math.isfinite(opt.last_grad_norm().item()) == (bad is None)
    backward(model, 1)
    opt.step(found_inf=torch.tensor(0.0, device=DEVICE))
    assert not torch.equal(next(model.parameters()).detach(), before[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_a_skipped_step_leaves_the_step_counts_of_a_gappy_active_set(backend, max_grad_norm):
    """The step counters of active slots that are not the bucket's first ones (a param without a
    grad between two with one) are added one by one, not as a prefix: a found_inf step leaves
    them, a finite one adds 1, and the param without a grad keeps its count."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, device=DEVICE)) for _ in range(3)]
    opt = SNRAdamW(params, backend=backend, max_grad_norm=max_grad_norm, **HP)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    params[1].grad = None
    for found, counts in ((1.0, [1, 1, 1]), (0.0, [2, 1, 2]), (3.0, [2, 1, 2])):
        for p in (params[0], params[2]):
            p.grad = torch.randn_like(p)
        opt.step(found_inf=torch.tensor(found, device=DEVICE))
        assert [int(opt.state[p]["step"]) for p in params] == counts, found


def test_last_grad_norm_says_what_it_needs():
    with pytest.raises(RuntimeError) as e:
        SNRAdamW([torch.nn.Parameter(torch.ones(3))]).last_grad_norm()
    assert str(e.value) == ("last_grad_norm() needs SNRAdamW(..., max_grad_norm=...): without it the step computes "
                            "no norm (use torch.nn.utils.get_total_norm)")
    with pytest.raises(RuntimeError) as e:
        SNRAdamW([torch.nn.Parameter(torch.ones(3))], max_grad_norm=1.0).last_grad_norm()
    assert str(e.value) == "last_grad_norm(): no step has run yet"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_without_grads_has_the_norm_of_no_grads(backend):
    """A step in which no param has a grad (a frozen phase, an all-None accumulation) had no N of
    its own: last_grad_norm() raised "no step has run yet", or gave the N of an earlier step, which
    a trainer then logged as this step's. The truth: clip_grad_norm_ over the same grads."""
    p = torch.nn.Parameter(torch.ones(3, device=DEVICE))
    twin = torch.nn.Parameter(torch.ones(3, device=DEVICE))
    opt = SNRAdamW([p], max_grad_norm=1.0, backend=backend)
    for grad in (None, torch.full((3,), 2.0, device=DEVICE), None):
        p.grad, twin.grad = grad, None if grad is None else grad.clone()  # clip_grad_norm_ scales its own
        opt.step()
        truth = torch.nn.utils.clip_grad_norm_([twin], 1.0)
        assert opt.last_grad_norm().device == p.device
        torch.testing.assert_close(opt.last_grad_norm().cpu(), truth.float().cpu(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), "1.0", True])
def test_bad_max_grad_norm_is_refused(value):
    with pytest.raises(ValueError, match="max_grad_norm must be None .* or a finite number > 0, got"):
        SNRAdamW([torch.nn.Parameter(torch.ones(3))], max_grad_norm=value)


def test_max_grad_norm_at_a_scripts_top_level_is_accepted():
    """The ZeroRedundancyOptimizer check walks up the caller's frames: from a script's top level
    (two frames, then none) it must find nothing and accept, as from deep inside a trainer."""
    script = ("import torch\nfrom snr_triton import SNRAdamW\np = torch.nn.Parameter(torch.ones(3))\n"
              "opt = SNRAdamW([p], max_grad_norm=0.5, backend='eager')\np.grad = torch.full((3,), 2.0)\n"
              "opt.step()\nprint(opt.last_grad_norm().item())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) == pytest.approx(math.sqrt(12.0), rel=1e-6)  # |(2, 2, 2)|


def test_max_grad_norm_is_the_whole_optimizers():
    opt = SNRAdamW([torch.nn.Parameter(torch.ones(3))], max_grad_norm=1.0)
    assert "max_grad_norm" not in opt.param_groups[0]
    with pytest.raises(ValueError, match="max_grad_norm is the whole optimizer's"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "max_grad_norm": 2.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
    assert "max_grad_norm" not in opt.param_groups[1]
    assert copy.deepcopy(opt).defaults["max_grad_norm"] == 1.0
    with pytest.raises(RuntimeError, match="needs SNRAdamW"):
        SNRAdamW([torch.nn.Parameter(torch.ones(3))]).last_grad_norm()


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_traces_without_graph_breaks(backend):
    torch._dynamo.reset()
    torch._logging.set_logs(dynamo=logging.ERROR)
    try:
        model, _ = models()
        opt = SNRAdamW(model.parameters(), lr=torch.tensor(1e-2, device=DEVICE), backend=backend, max_grad_norm=0.05)
        backward(model, 0)
        opt.step()
        backward(model, 1)
        explanation = torch._dynamo.explain(opt.step)()
        assert explanation.graph_break_count == 0, explanation.break_reasons
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("threads", [2, 3])
def test_the_norm_pass_of_a_large_bucket_counts_every_chunk(threads):
    """The C norm pass splits buckets of at least NORM_PARALLEL_MIN elements over threads, like the
    step: 2^22 + 2^15 elements (129 chunks) and a second tensor, against torch.nn.utils.get_total_norm.
    (The shared test matrix runs on every backend; this one is the C kernel's threaded path.)"""
    if "cpu" not in BACKENDS:
        pytest.skip("no C compiler here")  # the C kernel only: tests/test_cpu.py says why it is missing
    from snr_triton.backend import cpu

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (cpu.NORM_PARALLEL_MIN + cpu.CHUNK, 3 * cpu.CHUNK + 5)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = SNRAdamW(params, backend="cpu", max_grad_norm=1.0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        opt.step()
    finally:
        torch.set_num_threads(previous)
    # our norm accumulates in float64 (float32's accumulation is 1e-6 off at this size): the truth is
    # torch's norm of float64 copies
    expected = torch.nn.utils.get_total_norm([p.grad.double() for p in params]).float()
    torch.testing.assert_close(opt.last_grad_norm(), expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_grads_whose_squares_overflow_float32_are_clipped_not_skipped(backend):
    """|g| = 1e20: g^2 is inf in float32 (torch's own float32 norm is inf here), but the norm is
    finite, so the step clips instead of skipping. Against the norm of float64 copies and a plain
    SNRAdamW fed the clipped grads. One element in a run of whole chunks, one in the tail."""
    n = (1 << 15) + 7
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(n, generator=gen)
    grad[5], grad[n - 2] = 1e20, -3e19
    init = torch.randn(n, generator=gen)
    p = torch.nn.Parameter(init.clone().to(DEVICE))
    twin = torch.nn.Parameter(init.clone().to(DEVICE))
    ours = SNRAdamW([p], backend=backend, max_grad_norm=1.0, track_stats=True, **HP)
    plain = SNRAdamW([twin], backend=backend, **HP)
    p.grad = grad.to(DEVICE)
    ours.step()
    norm = grad.double().norm()
    torch.testing.assert_close(ours.last_grad_norm().cpu(), norm.float(), rtol=1e-7, atol=0)
    twin.grad = (grad.double() * (1.0 / (norm + 1e-6))).float().to(DEVICE)
    plain.step()
    assert ours.stats()["skipped_steps"] == 0 and torch.isfinite(p).all()
    close(p.detach(), twin.detach(), torch.float32)
    for key, value in plain.state[twin].items():
        close(ours.state[p][key], value, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.uint8], ids=["fp32_states", "8bit_states"])
def test_a_compiled_step_with_clipping_equals_eager_and_skips_on_device(backend, state_dtype):
    """Compiled (aot_eager, fullgraph: no host read of the norm or found_inf), a clipping step
    equals the uncompiled one, and a non-finite grad changes nothing, 8-bit codes and scales
    included (the eager backend then
    decides on the device: its step works on copies and stores only where found_inf is 0)."""
    torch._dynamo.reset()
    torch._logging.set_logs(dynamo=logging.ERROR)
    try:
        model, twin = models()
        opts = [SNRAdamW(m.parameters(), lr=torch.tensor(1e-2, device=DEVICE), backend=backend, max_grad_norm=0.05,
                         track_stats=True, alpha=0.5, state_dtype=state_dtype) for m in (model, twin)]
        for m, o in zip((model, twin), opts):
            backward(m, 0)
            o.step()
        compiled = torch.compile(opts[0].step, backend="aot_eager", fullgraph=True)
        for k in (1, 2, 3):
            backward(model, k)
            backward(twin, k)
            if k == 2:
                before = [p.detach().clone() for p in model.parameters()]
                states = [{key: v.clone() for key, v in opts[0].state[p].items()} for p in model.parameters()]
                next(model.parameters()).grad.view(-1)[0] = float("inf")
                next(twin.parameters()).grad.view(-1)[0] = float("inf")
            compiled()
            opts[1].step()
            if k == 2:
                for p, b, st in zip(model.parameters(), before, states):
                    assert torch.equal(p.detach(), b)
                    for key, value in st.items():
                        assert torch.equal(opts[0].state[p][key], value), key
                assert opts[0].stats()["skipped_steps"] == 1 and math.isnan(opts[0].stats()["mean_gate"])
        # GradScaler's arguments reach the compiled coefficient: grads 4x with grad_scale 4 step as
        # the twin's unscaled ones; a found_inf of 1 with finite grads skips and is counted
        for k, found in ((4, 0.0), (5, 1.0)):
            backward(model, k)
            backward(twin, k)
            for p in model.parameters():
                p.grad.mul_(4.0)
            before = [p.detach().clone() for p in model.parameters()]
            compiled(grad_scale=torch.tensor(4.0, device=DEVICE), found_inf=torch.tensor(found, device=DEVICE))
            # N of the skipped step too: the norm of g / grad_scale, the twin's unscaled grads
            truth = torch.nn.utils.get_total_norm([p.grad for p in twin.parameters()])
            torch.testing.assert_close(opts[0].last_grad_norm(), truth, rtol=1e-6, atol=0)
            if found:
                assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
            else:
                opts[1].step()
                torch.testing.assert_close(opts[0].last_grad_norm(), opts[1].last_grad_norm(), rtol=1e-6, atol=0)
        assert opts[0].stats()["skipped_steps"] == 2
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_one_param_step_with_clipping_equals_eager(backend):
    """A bucket of one param, compiled (aot_eager, fullgraph): the norm pass's output and the
    step with a single grad, against the same optimizer uncompiled."""
    torch._dynamo.reset()
    try:
        gen = torch.Generator().manual_seed(8)
        theta = torch.randn(12, generator=gen)
        params = [torch.nn.Parameter(theta.clone().to(DEVICE)) for _ in range(2)]
        opts = [SNRAdamW([p], lr=1e-2, backend=backend, max_grad_norm=0.05) for p in params]
        compiled = torch.compile(opts[0].step, backend="aot_eager", fullgraph=True)
        for k in range(3):
            g = torch.randn(12, generator=gen).to(DEVICE)
            for p in params:
                p.grad = g.clone()
            opts[1].step()
            if k == 0:
                opts[0].step()  # the state made eagerly, as in use
            else:
                compiled()
        torch.testing.assert_close(params[0], params[1], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opts[0].last_grad_norm(), opts[1].last_grad_norm(), rtol=1e-6, atol=0)
    finally:
        torch._dynamo.reset()


TOTALS = [0.0, 1e-300, 1e-12, 0.25, 1.0, 2.0, 1e6, 1e300, float("inf"), float("nan")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [0.05, 1.0, 1e3, 1e-200])  # 1e-200: k = 0 where N / scale is ~1e199
def test_the_coefficients_of_every_backend_round_as_the_torch_ops_do(backend, max_norm):
    """Each backend's `clip_coefficients` (the Triton kernel's one launch, the C backend's host
    arithmetic) against `clipping.torch_ops`, the arithmetic as the torch ops that
    test_equals_clip_grad_norm_then_step checks against clip_grad_norm_: bit for bit, for norms
    from 0 to float64's largest, inf and NaN, with and without a grad scale (0 and negative too:
    IEEE's division by 0 and its signs), found_inf and a count of skipped steps."""
    from snr_triton import backend as backends
    from snr_triton import clipping

    module = backends.get(backend)
    on = dict(dtype=torch.float64, device=DEVICE)
    for total in TOTALS:
        for scale in (None, 65536.0, 0.5, 1e-45, 0.0, -0.0, -2.0):
            for found in (None, 0.0, 2.0):
                for skipped in (None, 3.0):
                    args = (torch.tensor(total, **on),
                            torch.tensor(scale, dtype=torch.float32, device=DEVICE) if scale is not None else None,
                            torch.tensor(found, dtype=torch.float32, device=DEVICE) if found is not None else None,
                            torch.tensor(skipped, **on) if skipped is not None else None)
                    got = module.clip_coefficients(*args, max_norm)
                    want = clipping.torch_ops(*args, max_norm)
                    where = f"total={total}, grad_scale={scale}, found_inf={found}, skipped={skipped}"
                    for name, g, w in zip(("divide_by", "found_inf", "norm", "skipped"), got, want):
                        assert g.dtype == w.dtype and g.shape == w.shape and g.device == w.device, (name, where)
                        bits = torch.int32 if g.dtype == torch.float32 else torch.int64
                        assert (g.isnan() & w.isnan()) or torch.equal(g.view(bits), w.view(bits)), \
                            (name, where, g, w)  # NaN either way: its sign bit is the CPU's choice


# ops that only allocate or view: no kernel on a GPU
_HOST_ONLY = {"aten.empty.memory_format", "aten.new_empty.default", "aten.slice.Tensor", "aten.expand.default",
              "aten.view.default", "aten.as_strided.default"}


def test_a_clipped_step_on_the_triton_backend_adds_four_device_calls():
    """max_grad_norm's fixed cost, which on a GPU is per launch: on top of the plain step's device
    calls, the norm kernel, its partials' sum, the one coefficient kernel and the skip's test (the
    step counters then add `found_inf == 0`). With torch ops the coefficient alone was some twenty
    launches and the skip three more: 28 calls in all, against 6 now. Counted as torch
    ops that run kernels, plus Triton launches, for one bucket of four params; ops inside an
    interpreted kernel are the interpreter's own. (The C backend launches nothing: its cost is
    host time, in `snr-triton bench`'s host-overhead rows.)"""
    if not TRITON:
        pytest.skip("Triton is not installed here")
    from torch.utils._python_dispatch import TorchDispatchMode

    from snr_triton.backend import triton as triton_backend

    inside = [0]
    launches = [0]

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0] and str(func) not in _HOST_ONLY and not str(func).startswith("profiler."):
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    def device_calls(**kw):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(1000, device=DEVICE)) for _ in range(4)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = SNRAdamW(params, backend="triton", **kw)
        opt.step()
        opt.step()  # the third step is counted: every cache and table is warm
        Count.calls = launches[0] = 0
        with Count():
            opt.step()
        return Count.calls + launches[0]

    kernels = triton_backend.kernel_module()
    patched = []
    for cls in {type(k) for k in (kernels.snr_adamw_kernel, kernels.grad_sq_kernel, kernels.clip_coefficients_kernel)}:
        patched.append((cls, cls.run))

        def run(self, *args, _run=cls.run, **kwargs):
            launches[0] += 1
            inside[0] += 1
            try:
                return _run(self, *args, **kwargs)
            finally:
                inside[0] -= 1

        cls.run = run
    try:
        plain, clipped = device_calls(), device_calls(max_grad_norm=1.0)
    finally:
        for cls, run in patched:
            cls.run = run
    assert plain >= 2 and clipped - plain == 4, (plain, clipped)  # the plain step: the counters' add_, the kernel
