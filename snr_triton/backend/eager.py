"""The eager backend: the update as multi-tensor (foreach) torch ops.

The portable, checked path for any device and floating dtype the fused kernels do not serve.
It writes temporaries and reads host scalars (lr tensors, step counts, found_inf), so it is
neither the fastest path nor capturable in a CUDA graph.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..flat_state import FlatState, as_real
from ..hyperparams import Hyper


def unavailable_reason(device: torch.device, dtype: torch.dtype, hyper: Hyper) -> str | None:
    if not dtype.is_floating_point:
        return f"it steps floating-point params only, not {dtype}"
    return None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32, float64 for float64 params (ALGORITHM.md 'Numerics')."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round float32 to bfloat16 up or down with probability given by the distance: E[round(x)] = x."""
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & -65536  # clear the 16 bits bfloat16 drops
    out = rounded.view(torch.float32)
    # inf/nan must not be perturbed into another class
    return torch.where(torch.isfinite(x), out, x).to(torch.bfloat16)


def _upcast(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def _store(dst: Sequence[Tensor], src: Sequence[Tensor], streams: Sequence[int] | None = None) -> None:
    """Copy back into storage; with `streams` (one seed per tensor), bf16 rounds stochastically."""
    generator = None
    for k, (d, s) in enumerate(zip(dst, src)):
        if d is s:
            continue
        if streams is not None and d.dtype == torch.bfloat16:
            if generator is None:
                generator = torch.Generator(d.device)
            generator.manual_seed(streams[k])
            d.copy_(stochastic_round_to_bf16(s, generator))
        else:
            d.copy_(s)


def _gate(mhat2: list[Tensor], shat: list[Tensor], h: Hyper) -> list[Tensor]:
    """q per element, from m-hat^2 and s-hat (both consumed)."""
    gate, alpha, lam, delta = h.gate, h.alpha, h.softness, h.gate_eps
    if gate == "snr":
        den = torch._foreach_mul(shat, lam * alpha)
        torch._foreach_add_(den, mhat2)
        torch._foreach_add_(den, delta)
        torch._foreach_div_(mhat2, den)
        return mhat2
    if gate == "soft":
        d = torch._foreach_sub(mhat2, torch._foreach_mul(shat, alpha))
        torch._foreach_clamp_min_(d, 0.0)
        torch._foreach_mul_(shat, lam)
        torch._foreach_add_(shat, d)
        torch._foreach_add_(shat, delta)
        torch._foreach_div_(d, shat)
        return d
    if gate == "hard":
        torch._foreach_mul_(shat, alpha)
        return [(a > b).to(a.dtype) for a, b in zip(mhat2, shat)]
    raise AssertionError(gate)


PIECE = 1 << 20  # elements: large tensors are stepped in pieces ...
BATCH = 1 << 22  # ... and pieces in batches, so temporaries stay bounded whatever the model size


def _pieces(tensors: list[list[Tensor]], steps: list[Tensor], seeds: list[int]):
    """Split (param, grad, m, v, s) quintuples into flat pieces of at most PIECE elements; each
    piece carries its step (a 0-dim tensor), its random stream's seed (param seed + piece) and
    its param's index."""
    for j, (quint, t, seed) in enumerate(zip(zip(*tensors), steps, seeds)):
        if quint[0].numel() > PIECE and all(x.is_contiguous() for x in quint):
            for k, parts in enumerate(zip(*(x.view(-1).split(PIECE) for x in quint))):
                yield parts, t, seed + k, j
        else:
            yield quint, t, seed, j


def step(flat: FlatState, params: list[Tensor], grads: list[Tensor], hyper: Hyper, *,
         grad_scale: Tensor | None, found_inf: Tensor | None) -> Tensor | None:
    """One step for the active params of a bucket; all math in `compute_dtype`. Step counts,
    bias corrections and a tensor lr stay tensors (no host reads, so torch.compile traces it);
    grad_scale/found_inf and stochastic rounding's seeds are read on the host."""
    if not params:
        return None
    cdt = compute_dtype(flat.dtype)
    sums = None
    if hyper.track_stats:  # a buffer kept with the bucket, as the fused backends keep theirs
        sums = flat.stats_buffer(len(params), cdt).zero_()
    if found_inf is not None and found_inf.item() != 0:
        return sums
    exp_avgs, exp_avg_sqs, exp_grad_vars, steps = flat.real_views(params)
    seeds = [flat.seeds[flat.index[p]] for p in params]
    torch._foreach_add_(steps, 1)
    inv_scale = 1.0 / grad_scale.item() if grad_scale is not None else None
    quints = [[as_real(p) for p in params], [as_real(g) for g in grads], exp_avgs, exp_avg_sqs, exp_grad_vars]
    batch, size = [], 0
    for piece in _pieces(quints, steps, seeds):
        batch.append(piece)
        size += piece[0][0].numel()
        if size >= BATCH:
            sums = _step_pieces(batch, hyper, cdt, inv_scale, sums)
            batch, size = [], 0
    if batch:
        sums = _step_pieces(batch, hyper, cdt, inv_scale, sums)
    return sums


def _step_pieces(batch, h: Hyper, cdt: torch.dtype, inv_scale: float | None,
                 sums: Tensor | None) -> Tensor | None:
    """Step a batch of pieces; with `sums` ([params, STATS]), add each piece's gate sums to its param's row."""
    params, grads, exp_avgs, exp_avg_sqs, exp_grad_vars = (list(x) for x in zip(*(q for q, _, _, _ in batch)))
    track_stats = sums is not None
    beta1, beta2, rho, eps, wd, alpha = h.beta1, h.beta2, h.rho, h.eps, h.weight_decay, h.alpha

    # per-piece scalars as tensors: bias corrections in float64 (ALGORITHM.md), then cdt
    t = torch.stack([t for _, t, _, _ in batch]).to(torch.float64)
    lr = h.lr.to(t.device, torch.float64) if isinstance(h.lr, Tensor) else h.lr
    bc1 = 1 - beta1**t
    step_size = (-lr / bc1).to(cdt).unbind()
    bc2_sqrt = torch.sqrt(1 - beta2**t).to(cdt).unbind()
    bc3 = (1 - rho**t).to(cdt).unbind()
    first = (t == 1).unbind()
    open_gate = (t <= h.warmup_steps).unbind()
    bc1 = bc1.to(cdt).unbind()

    p = _upcast(params, cdt)
    g = _upcast(grads, cdt)
    m = _upcast(exp_avgs, cdt)
    v = _upcast(exp_avg_sqs, cdt)
    s = _upcast(exp_grad_vars, cdt)
    if inv_scale is not None:
        g = torch._foreach_mul(g, inv_scale)
    if h.maximize:
        g = torch._foreach_neg(g)

    diff = torch._foreach_sub(g, m)  # m before this step's update
    torch._foreach_mul_(s, rho)
    torch._foreach_addcmul_(s, diff, diff, 1 - rho)
    del diff
    torch._foreach_lerp_(m, g, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, 1 - beta2)
    del g

    if wd != 0:
        torch._foreach_mul_(p, 1 - lr * wd if not isinstance(lr, Tensor) else (1 - lr * wd).to(cdt))
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)

    gated = h.gate != "none"
    if gated or track_stats:
        mhat2 = torch._foreach_div(m, bc1)
        torch._foreach_mul_(mhat2, mhat2)
        # ALGORITHM.md: at t = 1 the gate uses s-hat := m-hat^2, its exact value
        shats = [torch.where(f, a, b / c) for f, a, b, c in zip(first, mhat2, s, bc3)]
        noise = torch._foreach_mul(shats, alpha)
    if gated:
        q = _gate([x.clone() for x in mhat2], shats, h)
        q = [torch.where(o, torch.ones_like(x), x) for o, x in zip(open_gate, q)]  # warmup: q = 1
        update = torch._foreach_mul(q, m)
    else:  # exactly torch AdamW's update
        q = [torch.ones_like(x) for x in m] if track_stats else None
        update = [x.clone() for x in m]
    torch._foreach_div_(update, denom)
    torch._foreach_mul_(update, step_size)
    torch._foreach_add_(p, update)
    if track_stats:  # one row per piece (contract.STATS order), added into its param's row
        rows = torch.stack([torch.stack([x.sum(), (a > b).sum().to(cdt), a.sum(), b.sum()])
                            for x, a, b in zip(q, mhat2, noise)])
        owner = torch.tensor([j for _, _, _, j in batch], device=rows.device)
        sums.index_add_(0, owner, rows)

    streams = None
    if h.stochastic_rounding:  # each piece's own stream, varied by step (read on the host)
        streams = [(seed + int(t) * 0x2545F4914F6CDD1D) & 0x7FFFFFFFFFFFFFFF for _, t, seed, _ in batch]
    _store(params, p, streams)
    _store(exp_avgs, m)
    _store(exp_avg_sqs, v)
    _store(exp_grad_vars, s)
    return sums
