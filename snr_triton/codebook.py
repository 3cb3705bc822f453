"""8-bit states: the code tables and the block encoding (ALGORITHM.md, "8-bit states").

A state of 8-bit storage is one uint8 code per element and one float32 scale per block of
BLOCK consecutive elements (in the state tensor's memory order; a param's last block may be
shorter). Code k of a block with scale a stands for a * table[k]. The tables are bitsandbytes'
`create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`, the ones bitsandbytes' and
torchao's 8-bit AdamW use (signed for m, unsigned for v and s), rebuilt here from their
definition. Encoding takes the nearest entry, ties to the lower code; every backend compares
x / a against the same float32 midpoints (`midpoints`), rounded down so that for a float32 x / a
the comparison is the exact one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import CODE_BLOCK as BLOCK  # elements per scale
from .contract import LUT_EXP_MIN, LUT_HALF, LUT_MANTISSA_BITS


def _build_table(signed: bool) -> Tensor:
    values: list[float] = [0.0, 1.0]
    for i in range(7):  # one decade per exponent, 10^-6 ... 10^0
        count = 2 ** i if signed else 2 ** (i + 1)  # the unsigned table has the sign bit as one more fraction bit
        bounds = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0  # float32, as bitsandbytes computes them
        decade = (10.0 ** (i - 6)) * means
        values += decade.tolist()
        if signed:
            values += (-decade).tolist()
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def _build_midpoints(q: Tensor) -> Tensor:
    q = q.double()
    exact = (q[:-1] + q[1:]) / 2  # exact in float64: two float32s' mean
    down = exact.float()
    lower = torch.nextafter(down, torch.tensor(-float("inf")))
    return torch.where(down.double() > exact, lower, down)  # the largest float32 <= the midpoint


# built once at import (module constants: torch.compile reads them without tracing a builder)
_TABLES = {signed: _build_table(signed) for signed in (True, False)}
_MIDPOINTS = {signed: _build_midpoints(_TABLES[signed]) for signed in (True, False)}
_ZERO_CODES = {signed: int((_TABLES[signed] == 0).nonzero()[0]) for signed in (True, False)}


_on_device: dict[tuple, Tensor] = {}  # (which table, signed, device) -> the table there


def _there(which: dict[bool, Tensor], signed: bool, device: torch.device | str) -> Tensor:
    """A table on `device`, copied there once (not on every decode and encode of the eager
    backend). Compiled code copies its own constant instead: a global cache written while tracing
    would be a side effect."""
    device = torch.device(device)
    if device.type == "cpu" or torch.compiler.is_compiling():
        return which[signed].to(device)
    key = (id(which), signed, device)
    found = _on_device.get(key)
    if found is None:
        found = _on_device[key] = _upload(which[signed], device)
    return found


def _upload(host: Tensor, device: torch.device) -> Tensor:
    """A once-per-device copy that does not make the host wait for the GPU: a copy from pageable
    memory synchronizes (the first 8-bit step raised under torch.cuda.set_sync_debug_mode("error")
    on an H200), one from pinned memory is queued (torch's pinned allocator keeps the buffer
    until the copy is done)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def table(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """The 256 float32 values the codes stand for, ascending (code k -> table[k])."""
    return _there(_TABLES, signed, device)


def midpoints(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """The 255 float32 thresholds: code(y) = number of thresholds < y (so a tie goes to the lower
    code); exact for float32 y because each is the largest float32 not above its midpoint."""
    return _there(_MIDPOINTS, signed, device)


def zero_code(signed: bool) -> int:
    """The code of 0 (what a zero state and a block whose scale is 0 hold)."""
    return _ZERO_CODES[signed]


def blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def flat(t: Tensor) -> Tensor:
    """A dense tensor's elements in memory order (the order blocks run in)."""
    return t if t.dim() == 1 and t.stride(0) == 1 else t.as_strided((t.numel(),), (1,))


def _per_element(scales: Tensor, numel: int) -> Tensor:
    return scales.repeat_interleave(BLOCK)[:numel]


def decode(codes: Tensor, scales: Tensor, signed: bool) -> Tensor:
    """float32 values of a coded state, laid out like `codes` (dense)."""
    out = torch.empty_like(codes, dtype=torch.float32)
    values = table(signed, codes.device)[flat(codes).long()] * _per_element(scales, codes.numel())
    flat(out).copy_(values)
    return out


def encode(x: Tensor, signed: bool, codes: Tensor | None = None, scales: Tensor | None = None
           ) -> tuple[Tensor, Tensor]:
    """Codes (laid out like `x`, dense) and per-block float32 scales of float32 values `x`:
    scale = max |x| over the block, code = the nearest table entry to x / scale (ties lower),
    the code of 0 where the scale is 0."""
    x = x.float()
    n = x.numel()
    values = flat(x)
    pad = blocks(n) * BLOCK - n
    absmax = torch.nn.functional.pad(values.abs(), (0, pad)).view(-1, BLOCK).amax(1)
    per = _per_element(absmax, n)
    y = values / torch.where(per == 0, 1.0, per)  # a zero scale: every x is 0, y = 0
    found = torch.searchsorted(midpoints(signed, x.device), y).to(torch.uint8)
    if codes is None:
        codes = torch.empty_like(x, dtype=torch.uint8)
    flat(codes).copy_(found)
    if scales is None:
        scales = absmax
    else:
        scales.copy_(absmax)
    return codes, scales


LOW_BITS = 23 - LUT_MANTISSA_BITS  # the mantissa bits of y below its lookup bucket's


def _bucket_ends(key: Tensor) -> tuple[Tensor, Tensor]:
    """The smallest and largest float32 of each lookup bucket (contract.LUT_*): sign, clamped
    exponent and top mantissa bits of y."""
    negative = key >= LUT_HALF
    k = torch.where(negative, key - LUT_HALF, key)
    e = (k >> LUT_MANTISSA_BITS) + LUT_EXP_MIN
    lo_mag = (e << 23) | ((k & ((1 << LUT_MANTISSA_BITS) - 1)) << LOW_BITS)
    hi_mag = lo_mag | ((1 << LOW_BITS) - 1)
    lo_mag = torch.where(k == 0, 0, lo_mag)  # bucket 0 also holds every exponent below LUT_EXP_MIN
    as_float = lambda bits: bits.to(torch.int32).view(torch.float32)  # noqa: E731
    small = torch.where(negative, -as_float(hi_mag), as_float(lo_mag))
    large = torch.where(negative, -as_float(lo_mag), as_float(hi_mag))
    return small, large


def packed_lut(signed: bool) -> Tensor:
    """The kernels' lookup table: per bucket, in one int32, the code of its smallest y (bits 0-7)
    and from bit 8 on the mantissa bits below the bucket's of the threshold in it, inverted in the
    negative buckets, or all ones where no threshold lies in it. y and a threshold in its bucket
    share sign, exponent and top mantissa bits, so y is above it exactly when y's low bits
    (inverted too when negative) exceed the entry's: one load per element, instead of the code's
    and then, dependent on it, its threshold's. Each bucket holds at most one threshold (checked)."""
    mids = midpoints(signed)
    small, large = _bucket_ends(torch.arange(2 * LUT_HALF, dtype=torch.int64))
    base = torch.searchsorted(mids, small)
    top = torch.searchsorted(mids, large)
    assert int((top - base).max()) <= 1, "a lookup bucket holds two thresholds: more mantissa bits"
    t = torch.cat([mids, torch.tensor([float("inf")])])[base]
    inside = (t >= small) & (t <= large)
    assert not inside[0] and not inside[LUT_HALF], "bucket 0 spans several exponents: no threshold may lie in it"
    low = t.abs().view(torch.int32) & ((1 << LOW_BITS) - 1)
    low = torch.where(torch.arange(2 * LUT_HALF) >= LUT_HALF, ~low & ((1 << LOW_BITS) - 1), low)
    return base.to(torch.int32) | torch.where(inside, low, (1 << LOW_BITS) - 1) << 8


def lookup_code(y: Tensor, signed: bool) -> Tensor:
    """The kernels' encoding of y = x / scale through `packed_lut`, in torch (tests check it
    against `encode`'s search)."""
    bits = y.view(torch.int32).long()
    mag = bits & 0x7FFFFFFF
    e = (mag >> 23).clamp(max=127)
    k = torch.where(e < LUT_EXP_MIN, 0, ((e - LUT_EXP_MIN) << LUT_MANTISSA_BITS)
                    | ((mag >> LOW_BITS) & ((1 << LUT_MANTISSA_BITS) - 1)))
    k = k + torch.where(bits < 0, LUT_HALF, 0)
    entry = packed_lut(signed)[k].long()
    low = (mag ^ torch.where(bits < 0, -1, 0)) & ((1 << LOW_BITS) - 1)
    above = low > (entry >> 8)
    return ((entry & 0xFF) + above.long()).to(torch.uint8)


_kernel_buffers: dict[torch.device, Tensor] = {}


def kernel_buffer(device: torch.device | str = "cpu") -> Tensor:
    """The tables both fused kernels read, in one int32 buffer (floats by their bits), kept per
    device: the signed then the unsigned table's 256 values, then the signed then the unsigned
    `packed_lut` of 2 * LUT_HALF entries each."""
    device = torch.device(device)
    buf = _kernel_buffers.get(device)
    if buf is None:
        parts = [table(signed).view(torch.int32) for signed in (True, False)]
        parts += [packed_lut(signed) for signed in (True, False)]
        buf = _kernel_buffers[device] = _upload(torch.cat(parts), device)
    return buf
