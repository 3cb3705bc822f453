"""The eager backend: the update as multi-tensor (foreach) torch ops.

The portable, checked path for any device and floating dtype the fused kernels do not serve.
It writes temporaries and reads stochastic rounding's seeds on the host (and a CPU found_inf
outside torch.compile), so it is neither the fastest path nor capturable in a CUDA graph.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import codebook
from ..clipping import torch_ops as clip_coefficients  # noqa: F401  (the backend interface)
from ..hyperparams import Hyper
from ..param_states import SIGNED, BucketStates, Slot


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


class Coded:
    """An 8-bit state (or a piece of one): codes, the scales of its blocks, which code table."""

    __slots__ = ("codes", "scales", "signed")

    def __init__(self, codes: Tensor, scales: Tensor, signed: bool):
        self.codes, self.scales, self.signed = codes, scales, signed

    def numel(self) -> int:
        return self.codes.numel()

    def is_contiguous(self) -> bool:
        return self.codes.is_contiguous()


def _split(x: Tensor | Coded) -> Sequence[Tensor | Coded]:
    """Pieces of PIECE elements (a multiple of codebook.BLOCK: 8-bit pieces hold whole blocks)."""
    if isinstance(x, Coded):
        return [Coded(c, s, x.signed) for c, s in
                zip(x.codes.view(-1).split(PIECE), x.scales.split(PIECE // codebook.BLOCK))]
    return x.view(-1).split(PIECE)


def _upcast(tensors: Sequence[Tensor | Coded], dtype: torch.dtype, copy: bool = False) -> list[Tensor]:
    """The values to compute with (8-bit states decoded: always a fresh tensor)."""
    return [codebook.decode(t.codes, t.scales, t.signed).to(dtype) if isinstance(t, Coded) else t.to(dtype, copy=copy)
            for t in tensors]


def _store(dst: Sequence[Tensor], src: Sequence[Tensor], streams: Sequence[int] | None = None,
           skip: Tensor | None = None) -> None:
    """Copy back into storage; with `streams` (one seed per tensor), bf16 rounds stochastically;
    where the 0-dim `skip` is true, the storage keeps its value (decided on the device)."""
    generator = None
    for k, (d, s) in enumerate(zip(dst, src)):
        if isinstance(d, Coded):  # 8-bit states: encoded in blocks
            codes, scales = codebook.encode(s, d.signed)
            d.codes.copy_(codes if skip is None else torch.where(skip, d.codes, codes))
            d.scales.copy_(scales if skip is None else torch.where(skip, d.scales, scales))
            continue
        if d is s:
            continue
        if streams is not None and d.dtype == torch.bfloat16:
            if generator is None:
                generator = torch.Generator(d.device)
            generator.manual_seed(streams[k])
            s = stochastic_round_to_bf16(s, generator)
        d.copy_(s if skip is None else torch.where(skip, d, s))


_TINY = torch.finfo(torch.float32).tiny  # the gate's denominator floor: 0 / 0 would be NaN
_HUGE = torch.finfo(torch.float32).max  # the gate's 1/c ceiling: 1/c of a subnormal c overflows


def _weight(h: Hyper) -> float:
    """k, the coefficient of s-hat in the gate's denominator (snr: lambda*alpha; soft: the larger of
    alpha, lambda; hard: alpha): b is weighed by sqrt(k) before the scaling, so that where k = 0
    (softness = 0, say) a large s-hat does not push m-hat out of float32's range."""
    if h.gate == "snr":
        return h.softness * h.alpha
    if h.gate == "soft":
        return max(h.alpha, h.softness)
    return h.alpha


def _gate(x: list[Tensor], yk: list[Tensor], tail: list[Tensor], h: Hyper) -> list[Tensor]:
    """q per element from x = m-hat^2/c^2, yk = k*s-hat/c^2 (k = _weight(h)) and delta/c^2
    (ALGORITHM.md, overflow-safe); consumes its inputs."""
    gate, alpha, lam, k = h.gate, h.alpha, h.softness, max(_weight(h), _TINY)
    if gate == "snr":
        den = torch._foreach_add(yk, x)
        torch._foreach_add_(den, tail)
        torch._foreach_clamp_min_(den, _TINY)  # 0 only where x = 0 (tail below range): q = 0
        torch._foreach_div_(x, den)
        return x
    if gate == "soft":
        d = torch._foreach_sub(x, torch._foreach_mul(yk, alpha / k))
        torch._foreach_clamp_min_(d, 0.0)
        torch._foreach_mul_(yk, lam / k)
        torch._foreach_add_(yk, d)
        torch._foreach_add_(yk, tail)
        torch._foreach_clamp_min_(yk, _TINY)  # 0 only where d = 0: q = 0
        torch._foreach_div_(d, yk)
        return d
    if gate == "hard":
        return [(a > b).to(a.dtype) for a, b in zip(x, yk)]
    raise AssertionError(gate)


PIECE = 1 << 20  # elements: large tensors are stepped in pieces ...
BATCH = 1 << 22  # ... and pieces in batches, so temporaries stay bounded whatever the model size


def _pieces(tensors: list[list[Tensor]], steps: list[Tensor], seeds: list[int]):
    """Split (param, grad, m, v, s) quintuples into flat pieces of at most PIECE elements; each
    piece carries its step (a 0-dim tensor), its random stream's seed (param seed + piece) and
    its param's index."""
    for j, (quint, t, seed) in enumerate(zip(zip(*tensors), steps, seeds)):
        if quint[0].numel() > PIECE and all(x.is_contiguous() for x in quint):
            for k, parts in enumerate(zip(*(_split(x) for x in quint))):
                yield parts, t, seed + k, j
        else:
            yield quint, t, seed, j


def step(bucket: BucketStates, slots: list[Slot], params: list[Tensor], grads: list[Tensor], hyper: Hyper, *,
         grad_scale: Tensor | None, found_inf: Tensor | None) -> Tensor | None:
    """One step for the active params of a bucket (local real views, with their slots); all math in
    `compute_dtype`. Step counts, bias corrections and a tensor lr stay tensors (no host reads, so
    torch.compile traces it); grad_scale stays a tensor; a found_inf on a GPU or under torch.compile
    is applied on the device (the step works on copies, stored where found_inf is 0), a CPU one is
    read on the host when not compiling (free there); stochastic rounding's seeds are read on the host."""
    if not params:
        return None
    cdt = compute_dtype(bucket.dtype)
    sums = None
    if hyper.track_stats:  # a buffer kept with the bucket, as the fused backends keep theirs
        sums = bucket.stats_buffer(len(params), cdt).zero_()
    skip = None
    if found_inf is not None:
        if found_inf.device.type == "cpu" and not torch.compiler.is_compiling():
            if found_inf.item() != 0:  # host memory: reading it waits for nothing
                return sums
        else:  # decided on the device: no synchronization, no graph break
            skip = found_inf != 0
    if bucket.state_dtype == torch.uint8:  # decoded piece by piece, encoded back
        exp_avgs, exp_avg_sqs, exp_grad_vars = ([Coded(s.real[k], s.scales[k], SIGNED[k]) for s in slots]
                                                for k in range(3))
    else:
        exp_avgs, exp_avg_sqs, exp_grad_vars = ([s.real[k] for s in slots] for k in range(3))
    steps = [s.step for s in slots]
    seeds = [s.seed for s in slots]
    if skip is None:
        torch._foreach_add_(steps, 1)
    else:  # a list of 0-dim tensors: the tensor-scalar overload reads its scalar on the host
        torch._foreach_add_(steps, [(~skip).to(steps[0].dtype)] * len(steps))
    inv_scale = grad_scale.reciprocal() if grad_scale is not None else None
    quints = [list(params), list(grads), exp_avgs, exp_avg_sqs, exp_grad_vars]
    batch, size = [], 0
    for piece in _pieces(quints, steps, seeds):
        batch.append(piece)
        size += piece[0][0].numel()
        if size >= BATCH:
            sums = _step_pieces(batch, hyper, cdt, inv_scale, sums, skip)
            batch, size = [], 0
    if batch:
        sums = _step_pieces(batch, hyper, cdt, inv_scale, sums, skip)
    if skip is not None and sums is not None:
        sums.masked_fill_(skip, 0)  # a skipped step has no stats, as in the fused kernels
    return sums


def _step_pieces(batch, h: Hyper, cdt: torch.dtype, inv_scale: Tensor | None,
                 sums: Tensor | None, skip: Tensor | None) -> Tensor | None:
    """Step a batch of pieces; with `sums` ([params, STATS]), add each piece's gate sums to its param's row."""
    params, grads, exp_avgs, exp_avg_sqs, exp_grad_vars = (list(x) for x in zip(*(q for q, _, _, _ in batch)))
    track_stats = sums is not None
    beta1, beta2, rho, eps, wd, alpha = h.beta1, h.beta2, h.rho, h.eps, h.weight_decay, h.alpha

    # per-piece scalars as tensors: bias corrections in float64 (ALGORITHM.md), then cdt
    t = torch.stack([t for _, t, _, _ in batch]).to(torch.float64)
    lr = h.lr.to(t.device, torch.float64) if isinstance(h.lr, Tensor) else h.lr
    bc1 = 1 - beta1**t
    bc3 = 1 - rho**t
    step_size = (-lr / bc1).to(cdt).unbind()
    bc2_sqrt = torch.sqrt(1 - beta2**t).to(cdt).unbind()
    b_scale = (bc1 / torch.sqrt(bc3)).to(cdt).unbind()  # sqrt(s) * b_scale = bc1 * sqrt(s-hat)
    tail_scale = (h.gate_eps * bc1 * bc1).to(cdt).unbind()
    first = (t == 1).unbind()
    open_gate = (t <= h.warmup_steps).unbind()
    bc3 = bc3.to(cdt).unbind()
    bc1 = bc1.to(cdt).unbind()

    keep = skip is not None  # the step may be skipped: work on copies, stored where not skipped
    p = _upcast(params, cdt, keep)
    g = _upcast(grads, cdt)
    m = _upcast(exp_avgs, cdt, keep)
    v = _upcast(exp_avg_sqs, cdt, keep)
    s = _upcast(exp_grad_vars, cdt, keep)
    if inv_scale is not None:
        g = torch._foreach_mul(g, inv_scale)
    if h.maximize:
        g = torch._foreach_neg(g)

    # s += ((1-rho)*diff)*diff and v += ((1-beta2)*g)*g, the coefficient first: finite for every finite
    # g (|g| = 3e19 squares past float32's range). addcmul's own order differs by device: the CPU
    # kernel multiplies the value in first, CUDA's _foreach_addcmul_ squares first (inf on an H200).
    diff = torch._foreach_sub(g, m)  # m before this step's update
    if rho == 0:  # s_t is this step's square, whatever s_{t-1} was (0 * inf would be NaN)
        torch._foreach_zero_(s)
    else:
        torch._foreach_mul_(s, rho)
    torch._foreach_addcmul_(s, torch._foreach_mul(diff, 1 - rho), diff)
    torch._foreach_lerp_(m, g, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, torch._foreach_mul(g, 1 - beta2), g)
    del diff, g

    if wd != 0:
        torch._foreach_mul_(p, 1 - lr * wd if not isinstance(lr, Tensor) else (1 - lr * wd).to(cdt))
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)

    gated = h.gate != "none"
    if gated or track_stats:
        # the gate, overflow-safe (ALGORITHM.md "Numerics"): a = |m|, b = bc1*sqrt(s-hat) weighed by
        # sqrt(k) (_weight), c = max(a, b); x = (a/c)^2 = m-hat^2/c'^2, yk = (b/c)^2 = k*s-hat/c'^2,
        # tail = delta/c'^2 with c' = c/bc1
        a = torch._foreach_abs(m)
        b = [torch.where(f, ai, torch.sqrt(si) * k) for f, ai, si, k in zip(first, a, s, b_scale)]  # t=1: s-hat := m-hat^2
        above = [ai > bi * alpha**0.5 for ai, bi in zip(a, b)]  # m-hat^2 > alpha*s-hat, unsquared
        weight = _weight(h)
        b = [bi * weight**0.5 if weight > 0 else torch.zeros_like(bi) for bi in b]  # not inf * 0
        c = torch._foreach_maximum(a, b)
        zero_c = [ci == 0 for ci in c]  # m = s = 0: q = 0
        inv = torch._foreach_reciprocal([torch.where(z, torch.ones_like(ci), ci) for z, ci in zip(zero_c, c)])
        # a subnormal c: 1/c overflows, and 0 * inf would be NaN; FLT_MAX (the same for every normal c)
        # keeps x, y finite and the tail inf, so q = 0, as the C kernel's exact scaling gives
        torch._foreach_clamp_max_(inv, _HUGE)
        # the larger of a, b is exactly 1: also when s overflowed to inf
        x = [torch.where(ai >= bi, 1.0, ai * ii) for ai, bi, ii in zip(a, b, inv)]
        torch._foreach_mul_(x, x)
        y = [torch.where(bi >= ai, 1.0, bi * ii) for ai, bi, ii in zip(a, b, inv)]
        torch._foreach_mul_(y, y)
        del a, b, c
    if gated:
        tail = torch._foreach_mul(inv, inv)
        torch._foreach_mul_(tail, tail_scale)
        q = _gate(x, y, tail, h)  # x, y are not needed after this
        q = [torch.where(o, torch.ones_like(qi), torch.where(z, torch.zeros_like(qi), qi))
             for o, z, qi in zip(open_gate, zero_c, q)]  # warmup: q = 1
        update = torch._foreach_mul(q, m)
    else:  # exactly torch AdamW's update
        q = [torch.ones_like(x) for x in m] if track_stats else None
        update = [x.clone() for x in m]
    torch._foreach_div_(update, denom)
    torch._foreach_mul_(update, step_size)
    torch._foreach_add_(p, update)
    if track_stats:  # one row per piece (contract.STATS order), added into its param's row
        mhat2 = torch._foreach_div(m, bc1)
        torch._foreach_mul_(mhat2, mhat2)
        noise = [torch.where(f, a2, si / c) * alpha for f, a2, si, c in zip(first, mhat2, s, bc3)]
        rows = torch.stack([torch.stack([qi.sum(), ab.sum().to(cdt), a2.sum(), nz.sum()])
                            for qi, ab, a2, nz in zip(q, above, mhat2, noise)])
        owner = torch.tensor([j for _, _, _, j in batch], device=rows.device)
        sums.index_add_(0, owner, rows)

    streams = None
    if h.stochastic_rounding:  # each piece's own stream, varied by step (read on the host)
        streams = [(seed + int(t) * 0x2545F4914F6CDD1D) & 0x7FFFFFFFFFFFFFFF for _, t, seed, _ in batch]
    _store(params, p, streams, skip)
    _store(exp_avgs, m, skip=skip)
    _store(exp_avg_sqs, v, skip=skip)
    _store(exp_grad_vars, s, skip=skip)
    return sums


def grad_sq_sum(bucket: BucketStates, slots: list[Slot], params: list[Tensor], grads: list[Tensor]) -> Tensor:
    """Sum of g^2 over the active grads, as torch's multi-tensor norm, accumulated in float64 (finite
    for every finite grad)."""
    norms = torch._foreach_norm(list(grads), 2, dtype=torch.float64)
    return torch.stack(norms).square().sum()
