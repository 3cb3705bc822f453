"""Checks that need a CUDA device: CUDA-graph capture and >2^31-element buffers (int64 indexing).

Skipped on machines without a GPU; bench/gpu_check.sh runs them where there is one.
"""

import copy

import pytest
import torch

from snr_triton import SNRAdamW

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


STATE_DTYPES = pytest.mark.parametrize("state_dtype", [torch.float32, torch.uint8],
                                       ids=["fp32-states", "8-bit-states"])


@STATE_DTYPES
def test_cuda_graph_capture_and_replay(state_dtype):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32).cuda()
    twin = copy.deepcopy(model)
    opt = SNRAdamW(model.parameters(), lr=torch.tensor(1e-2, device="cuda"), backend="triton",
                   state_dtype=state_dtype)
    twin_opt = SNRAdamW(twin.parameters(), lr=1e-2, backend="triton", state_dtype=state_dtype)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(6)]
    static = [torch.zeros_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), static):
        p.grad = g
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture: state, tables, compilation
        for g, src in zip(static, grads[0]):
            g.copy_(src)
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for gs in grads[1:]:
        for g, src in zip(static, gs):
            g.copy_(src)
        graph.replay()
    for gs in grads:
        for p, g in zip(twin.parameters(), gs):
            p.grad = g.clone()
        twin_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(opt.state[p]["step"].item() == 6 for p in model.parameters())


def test_more_than_2_pow_31_elements():
    """The last elements of a 2^31 + 4096 element tensor get the closed-form first step."""
    n = (1 << 31) + 4096
    p = torch.nn.Parameter(torch.ones(n, device="cuda", dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    opt = SNRAdamW([p], lr=0.25, weight_decay=0.0, gate="snr", backend="triton",
                   state_dtype=torch.bfloat16)
    opt.step()
    # t = 1: m-hat = g = 1, s-hat = g^2 = 1, so q = 1/2 and theta = 1 - lr/2 * 1/(1 + eps)
    expected = torch.tensor(1 - 0.125 / (1 + 1e-8), dtype=torch.bfloat16, device="cuda")
    for lo, hi in ((0, 4), ((1 << 31) - 2, (1 << 31) + 2), (n - 4, n)):
        assert torch.all(p.detach()[lo:hi] == expected), (lo, hi)
    assert torch.all(opt.state[p]["exp_avg"][-4:] == torch.tensor(0.1, dtype=torch.bfloat16, device="cuda"))


def test_torch_compile_of_a_full_training_step():
    """Forward, backward and SNRAdamW.step in one compiled function equal the same step eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).cuda()
    twin = copy.deepcopy(model)
    opts = [SNRAdamW(m.parameters(), lr=torch.tensor(1e-3, device="cuda"), backend="triton") for m in (model, twin)]
    data = [(torch.randn(32, 64, device="cuda"), torch.randn(32, 8, device="cuda")) for _ in range(5)]

    def train_step(m, opt, x, y):
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss

    compiled = torch.compile(train_step)
    for x, y in data:
        compiled(model, opts[0], x, y)
        train_step(twin, opts[1], x, y)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@STATE_DTYPES
def test_no_host_synchronization_in_a_step(state_dtype):
    """Issue 18: 20 steps as users run them (fresh grads from zero_grad() + backward, an active set
    that changes, a param joining late, a CUDA tensor lr, GradScaler, stats on, max_grad_norm) with
    torch raising on any synchronizing CUDA call inside step(). The first step (state creation) is
    included."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda()
    late = torch.nn.Parameter(torch.randn(8, device="cuda"))
    opt = SNRAdamW(list(model.parameters()) + [late], lr=torch.tensor(1e-3, device="cuda"), backend="triton",
                   track_stats=True, max_grad_norm=1.0,  # the norm pass and its coefficient too
                   state_dtype=state_dtype)
    scaler = torch.amp.GradScaler("cuda")
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 8, device="cuda")
    for k in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x) + (late if k >= 10 else 0), y)
        scaler.scale(loss).backward()
        if k % 3 == 1:
            model[0].bias.grad = None  # another active set
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    steps = opt.state[model[2].weight]["step"].item()
    assert 15 <= steps <= 20  # GradScaler skips a few early steps while it finds its scale
    assert opt.state[late]["step"].item() <= 10 and opt.stats()["mean_gate"] >= 0


def _whole_step_models():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).cuda()
    twin = copy.deepcopy(model)
    opts = [SNRAdamW(m.parameters(), lr=torch.tensor(1e-3, device="cuda"), backend="triton", max_grad_norm=1.0)
            for m in (model, twin)]
    gen = torch.Generator(device="cuda").manual_seed(1)
    data = [(torch.randn(32, 64, device="cuda", generator=gen), torch.randn(32, 8, device="cuda", generator=gen))
            for _ in range(6)]
    return model, twin, opts, data


def _eager_steps(model, opt, data):
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_a_whole_training_step_captured_by_hand_in_a_cuda_graph():
    """Issue 19: forward, backward and step (with max_grad_norm) in one torch.cuda.graph, the recipe
    of torch's CUDA-graph notes (warm-up on a side stream, grads set to None before capture, static
    inputs), replayed on new data: equal to the same steps run eagerly."""
    model, twin, (opt, twin_opt), data = _whole_step_models()
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state, block maps, kernels compiled
        _eager_steps(model, opt, [(static_x, static_y)] * 3)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        torch.nn.functional.mse_loss(model(static_x), static_y).backward()
        opt.step()
    for x, y in data[1:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    _eager_steps(twin, twin_opt, [data[0]] * 3 + data[1:])
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.state[model[0].weight]["step"].item() == 3 + len(data) - 1


@pytest.mark.xfail(strict=True, reason="known wrong answer, not yet fixed (bench/RESULTS.md, GPU 2026-12-04): "
                   "on an H200 with torch 2.11 the compiled steps differ from the eager ones (8054 of 8192 "
                   "elements, up to 4.7e-4); README says to capture the step by hand (torch.cuda.graph) instead")
def test_a_whole_training_step_under_compile_reduce_overhead():
    """Issue 19: forward, backward and step in one torch.compile(mode="reduce-overhead") function
    (CUDA graphs by inductor's cudagraph trees where it can), equal to the eager steps. One eager
    step first, as for torch.cuda.graph: the states and the bucket's block map are made outside the
    graphs' memory pool (made during cudagraph trees' warm-up, they are pool memory that no graph
    output owns, and inductor refuses them: seen on an H200, torch 2.11)."""
    model, twin, (opt, twin_opt), data = _whole_step_models()
    _eager_steps(model, opt, data[:1])
    _eager_steps(twin, twin_opt, data[:1])

    def train_step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss.detach()

    compiled = torch.compile(train_step, mode="reduce-overhead")
    for x, y in data:
        compiled(x, y)
        torch.compiler.cudagraph_mark_step_begin()
    _eager_steps(twin, twin_opt, data)
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
