"""8-bit states (state_dtype=torch.uint8; ALGORITHM.md "8-bit states") against independent truths:
the code tables against their closed form and bitsandbytes' own, the encoding against a brute-force
nearest search (snr_triton.reference.encode_8bit), every step against the float64 reference started
from the same codes, checkpoints bit-exact and converted from and to float states and AdamW's."""

import copy
import io
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICE
from snr_triton import SNRAdamW, codebook, reference
from snr_triton.backend import available, get
from snr_triton.hyperparams import Hyper, DEFAULTS, RUNTIME_DEFAULTS
from snr_triton.param_states import local

KEYS = ("exp_avg", "exp_avg_sq", "exp_grad_var")
SIGNED = {"exp_avg": True, "exp_avg_sq": False, "exp_grad_var": False}
HYPER_8BIT = Hyper.of({**DEFAULTS, **RUNTIME_DEFAULTS, "state_dtype": torch.uint8})
BACKENDS_8BIT = available(torch.device(DEVICE), torch.float32, HYPER_8BIT)
HP = dict(lr=1e-2, betas=(0.9, 0.999), rho=0.99, eps=1e-8, weight_decay=0.1, gate="snr", alpha=0.5, softness=2.0,
          gate_eps=1e-16, warmup_steps=0, maximize=False)


def closed_form(signed: bool) -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed, 7, 8) in exact arithmetic: for decade i = 0..6 the
    midpoints of 2^i (signed) or 2^(i+1) (unsigned) equal steps of [0.1, 1], times 10^(i-6), with
    their negatives when signed; then 0 and 1."""
    values = [0.0, 1.0]
    for i in range(7):
        n = 2**i if signed else 2 ** (i + 1)
        for j in range(n):
            x = 10.0 ** (i - 6) * (0.1 + 0.9 * (j + 0.5) / n)
            values += [x, -x] if signed else [x]
    return torch.tensor(sorted(values), dtype=torch.float64)


@pytest.mark.parametrize("signed", [True, False])
def test_the_code_tables_are_the_dynamic_maps_of_their_definition(signed):
    q = codebook.table(signed)
    exact = closed_form(signed)
    assert q.dtype == torch.float32 and q.shape == (256,)
    assert torch.all(q[1:] > q[:-1])  # 256 distinct codes, ascending
    assert q[-1] == 1 and q[codebook.zero_code(signed)] == 0 and (q[0] == 0) != signed
    # bitsandbytes computes in float32: a few ulps from the exact values
    assert torch.all((q.double() - exact).abs() <= 4 * 2.0**-24 * exact.abs())


def test_the_code_tables_built_under_a_float64_default_dtype_are_the_same(tmp_path):
    """The tables are built when snr_triton is imported, which may come after scientific code's
    torch.set_default_dtype(torch.float64): they are bitsandbytes' float32 computation still."""
    out = tmp_path / "tables.pt"
    script = ("import torch, sys; torch.set_default_dtype(torch.float64); from snr_triton import codebook; "
              "torch.save({s: (codebook.table(s), codebook.midpoints(s)) for s in (True, False)}, sys.argv[1])")
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=120)
    for signed, (q, mids) in torch.load(out).items():
        assert q.dtype == mids.dtype == torch.float32, signed  # torch.equal compares values across dtypes
        assert torch.equal(q, codebook.table(signed)) and torch.equal(mids, codebook.midpoints(signed)), signed


@pytest.mark.parametrize("signed", [True, False])
def test_the_code_tables_equal_bitsandbytes_create_dynamic_map(signed):
    functional = pytest.importorskip("bitsandbytes.functional")  # the test extra installs it
    assert torch.equal(codebook.table(signed), functional.create_dynamic_map(signed, 7, 8))


@pytest.mark.parametrize("signed", [True, False])
def test_the_tables_are_copied_to_an_accelerator_once_not_on_every_call(signed):
    """The eager backend decodes and encodes with `table` and `midpoints` every step: on a device
    other than the CPU each is copied there once ("meta" stands in for a GPU here)."""
    for get_table in (codebook.table, codebook.midpoints):
        first = get_table(signed, "meta")
        assert first.device.type == "meta" and first.shape == get_table(signed).shape
        assert get_table(signed, torch.device("meta")) is first
    assert codebook.table(signed, "meta") is not codebook.table(not signed, "meta")


@pytest.mark.parametrize("signed", [True, False])
def test_encoding_takes_the_nearest_code_and_ties_to_the_lower(signed):
    q = codebook.table(signed).double()
    mids = (q[:-1] + q[1:]) / 2
    exact = mids[mids.float().double() == mids].float()  # midpoints a float32 holds exactly
    above = torch.nextafter(exact, torch.tensor(2.0))
    values = torch.cat([exact, above])
    x = torch.cat([torch.cat([torch.ones(1), part]) for part in values.split(255)])  # a 1 in every block
    codes, scales = codebook.encode(x, signed)
    assert scales.tolist() == [1.0] * len(scales)  # scale 1: x / scale = x
    codes = torch.cat([part[1:] for part in codes.split(256)]).long()
    lower = torch.searchsorted(q, exact.double()) - 1  # the code just below each midpoint
    assert exact.numel() > 50
    assert torch.equal(codes[:len(exact)], lower)  # a tie: the lower code
    assert torch.equal(codes[len(exact):], lower + 1)  # just above it: the upper one
    ref_codes, ref_scales, _ = reference.encode_8bit(x.double(), signed)
    assert torch.equal(codebook.encode(x, signed)[0], ref_codes) and torch.equal(scales, ref_scales)
    # midpoints a float32 cannot hold: the float below is nearer the lower code, the one above the upper
    x = tie_values(signed)
    codes, _ = codebook.encode(x, signed)
    assert torch.equal(codes, reference.encode_8bit(x.double(), signed)[0])
    assert torch.equal(codes, codebook.lookup_code(x, signed))


def tie_values(signed: bool) -> torch.Tensor:
    """Every midpoint of the table a float32 holds exactly and the float just above each; for the
    others the two floats around the midpoint. In blocks that each start with 1 (so every block's
    scale is 1 and x / scale = x)."""
    q = codebook.table(signed).double()
    mids = (q[:-1] + q[1:]) / 2
    held = mids.float().double() == mids
    exact = mids[held].float()
    near = mids[~held].float()  # rounded to nearest: one of the two floats around the midpoint
    below = torch.where(near.double() > mids[~held], torch.nextafter(near, torch.tensor(-2.0)), near)
    values = torch.cat([exact, torch.nextafter(exact, torch.tensor(2.0)), below,
                        torch.nextafter(below, torch.tensor(2.0))])
    return torch.cat([torch.cat([torch.ones(1), part]) for part in values.split(255)])


@pytest.mark.parametrize("signed", [True, False])
def test_the_kernels_lookup_table_finds_the_codes_of_the_threshold_search(signed):
    """The fused kernels' encoding (sign, exponent and mantissa bits to a bucket, one comparison
    with the low mantissa bits of the threshold packed in the bucket's entry) against the threshold
    search, on random float32s of [-1, 1] and on every threshold +- 1 ulp."""
    gen = torch.Generator().manual_seed(12)
    y = torch.randint(0, 0x3F800001, (1_000_000,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
    th = codebook.midpoints(signed)
    y = torch.cat([y, -y, th, torch.nextafter(th, torch.tensor(2.0)), torch.nextafter(th, torch.tensor(-2.0)),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])])
    y = y if signed else y.abs()
    assert torch.equal(codebook.lookup_code(y, signed), torch.searchsorted(th, y).to(torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS_8BIT)
def test_a_step_encodes_exactly_as_the_threshold_search_ties_included(backend):
    """beta1 = 0 makes the new m the grad itself, so its codes are those of the grads: midpoints
    (ties: the lower code) and the floats just above them, bit for bit on every backend."""
    g = tie_values(True)
    p = torch.nn.Parameter(torch.zeros(g.numel(), device=DEVICE))
    opt = SNRAdamW([p], betas=(0.0, 0.999), backend=backend, state_dtype=torch.uint8)
    p.grad = g.to(DEVICE)
    opt.step()
    codes, scales = codebook.encode(g, True)
    ref_codes, _, _ = reference.encode_8bit(g.double(), True)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(opt.state[p]["exp_avg_codes"].cpu(), codes)
    assert torch.equal(opt.state[p]["exp_avg_scales"].cpu(), scales) and torch.all(scales == 1)


@pytest.mark.parametrize("signed", [True, False])
def test_encoding_agrees_with_the_brute_force_nearest_search(signed):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20_000, generator=gen) * torch.logspace(-12, 3, 20_000).float()  # blocks of many scales
    x = x if signed else x.abs()
    x[512:768] = 0  # a zero block: every code is the code of 0, the scale 0
    codes, scales = codebook.encode(x, signed)
    ref_codes, ref_scales, decoded = reference.encode_8bit(x.double(), signed)
    assert torch.equal(scales, ref_scales) and scales[2] == 0
    assert torch.all(codes[512:768] == codebook.zero_code(signed))
    # x / scale in float32 and in float64 may fall on two sides of a midpoint: then one code apart
    differ = codes != ref_codes
    assert differ.sum() <= 2 and torch.all((codes.long() - ref_codes.long()).abs() <= 1)
    torch.testing.assert_close(codebook.decode(codes, scales, signed)[~differ], decoded[~differ].float(),
                               rtol=2**-23, atol=0)


@pytest.mark.parametrize("backend", BACKENDS_8BIT)
def test_a_block_of_zeros_holds_the_code_of_zero_and_scale_zero(backend):
    torch.manual_seed(20)
    g = torch.randn(600)
    g[256:512] = 0  # the second block: m, v, s stay 0
    p = torch.nn.Parameter(torch.zeros(600, device=DEVICE))
    opt = SNRAdamW([p], backend=backend, state_dtype=torch.uint8)
    p.grad = g.to(DEVICE)
    opt.step()
    for key in KEYS:
        assert opt.state[p][key + "_scales"][1] == 0 and opt.state[p][key + "_scales"][0] > 0
        assert torch.all(opt.state[p][key + "_codes"][256:512] == codebook.zero_code(SIGNED[key])), key


@pytest.mark.parametrize("backend", BACKENDS_8BIT)
def test_a_nan_grad_makes_its_blocks_states_nan_as_in_the_reference(backend):
    """A NaN in a block's new values makes its scale NaN (torch.amax's max, and the reference's),
    so the block decodes as NaN, as float states keep the NaN. The C and Triton max skipped the
    NaN and encoded it as a finite code: their states healed where the eager backend's and the
    reference's did not, and the params of the block went on stepping."""
    gen = torch.Generator().manual_seed(21)
    n = 600
    p = torch.nn.Parameter(torch.randn(n, generator=gen).to(DEVICE))
    opt = SNRAdamW([p], backend=backend, state_dtype=torch.uint8, **HP)
    for t in range(4):
        g = torch.randn(n, generator=gen)
        if t == 1:
            g[5] = float("nan")  # in the first block
        st = _coded_reference_state(opt, p) if t else reference.new_state(p)
        ref_p = p.detach().clone()
        p.grad = g.to(DEVICE)
        opt.step()
        reference.reference_step(ref_p, g.to(DEVICE), st, **HP, state_dtype=torch.uint8)
        assert torch.equal(p.detach().isnan(), ref_p.isnan()), t
        for key in KEYS:
            decoded = opt.decoded_state(p)[key]
            assert torch.equal(decoded.isnan(), st[key].isnan()), (t, key)
            assert torch.equal(opt.state[p][key + "_scales"].isnan(), torch.tensor([t >= 1, False, False], device=DEVICE))
        finite = ~ref_p.isnan()
        torch.testing.assert_close(p.detach()[finite].double(), ref_p[finite].double(), rtol=2e-7, atol=1e-5 * HP["lr"])
    assert int(p.detach().isnan().sum()) == 256  # the NaN step: one element; the next: its whole block


@pytest.mark.parametrize("backend", BACKENDS_8BIT)
def test_a_block_never_spans_two_params_and_the_last_is_shorter(backend):
    """Each param's blocks start at its own first element; its largest v and s of a block encode
    as code 255 (table value 1), so each block's largest decoded value is its scale."""
    gen = torch.Generator().manual_seed(15)
    params = [torch.nn.Parameter(torch.zeros(n, device=DEVICE)) for n in (300, 256, 5)]
    opt = SNRAdamW(params, state_dtype=torch.uint8, backend=backend)
    scale = {300: 1.0, 256: 1e3, 5: 1e-3}  # a block spanning two params would mix these
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * scale[p.numel()]).to(DEVICE)
    opt.step()
    for p in params:
        for key in ("exp_avg_sq", "exp_grad_var"):
            scales = opt.state[p][key + "_scales"]
            assert scales.shape == (-(-p.numel() // 256),)
            decoded = opt.decoded_state(p)[key]
            block_max = torch.stack([part.max() for part in decoded.split(256)])
            assert torch.equal(block_max, scales)
            torch.testing.assert_close(block_max, (1 - 0.999) * torch.stack(
                [part.pow(2).max() for part in p.grad.float().split(256)]) * (1 if key == "exp_avg_sq" else 10),
                rtol=1e-5, atol=0)


def _coded_reference_state(opt, p):
    """The reference's state from the optimizer's own codes (decoded in float64)."""
    st = {"step": int(opt.state[p]["step"])}
    for key in KEYS:
        codes, scales = opt.state[p][key + "_codes"], opt.state[p][key + "_scales"]
        q = codebook.table(SIGNED[key], codes.device).double()
        st[key] = (q[codebook.flat(codes).long()] * scales.double().repeat_interleave(256)[:codes.numel()]
                   ).reshape(codes.shape) if codes.is_contiguous() else None
    return st


SERVED = [(b, d) for b in BACKENDS_8BIT for d in (torch.float32, torch.bfloat16, torch.float64)
          if get(b).unavailable_reason(torch.device(DEVICE), d, HYPER_8BIT) is None]


@pytest.mark.parametrize("backend,dtype", SERVED)
@pytest.mark.parametrize("gate", ["snr", "soft", "hard", "none"])
def test_each_step_matches_the_reference_from_the_same_codes(backend, gate, dtype):
    gen = torch.Generator().manual_seed(2)
    n = 3000
    p = torch.nn.Parameter(torch.randn(n, generator=gen).to(DEVICE, dtype))
    hp = {**HP, "gate": gate}
    opt = SNRAdamW([p], backend=backend, state_dtype=torch.uint8, **{k: v for k, v in hp.items()})
    differ_total, moved = 0, False
    for t in range(6):
        g = (torch.randn(n, generator=gen) * 0.1 + 0.05).to(DEVICE, dtype)
        st = _coded_reference_state(opt, p) if t else reference.new_state(p)
        ref_p = p.detach().clone()
        st_theta = ref_p.clone()
        p.grad = g.clone()
        opt.step()
        reference.reference_step(ref_p, g, st, **hp, state_dtype=torch.uint8)
        differ = 0
        for key in KEYS:
            codes, ref_codes = opt.state[p][key + "_codes"], st[key + "_codes"]
            scales = opt.state[p][key + "_scales"]
            # the scale is max |x| of the new float32 values: within a few ulps of the float64 one's
            torch.testing.assert_close(scales, st[key + "_scales"], rtol=2.0**-22, atol=0)
            assert torch.all((codes.long() - ref_codes.long()).abs() <= 1), key
            differ += int((codes != ref_codes).sum())
        differ_total += differ
        # the update uses the new float32 values, before encoding: params as with float32 states
        ulp = 2 * torch.finfo(dtype).eps * ref_p.double().abs()  # both round to the param's dtype
        err = (p.detach().double() - ref_p.double()).abs()
        assert torch.all(err <= ulp + 1e-5 * hp["lr"]), (t, float(err.max()))
        moved = moved or not torch.equal(p.detach(), st_theta)
    assert moved or gate == "hard"  # it moved, alike
    assert differ_total <= 3 * 6 * n * 1e-3  # codes on midpoints, rounded either way: rare


@pytest.mark.parametrize("backend", BACKENDS_8BIT)
def test_resuming_from_a_checkpoint_is_bit_exact(backend):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 4)).to(DEVICE)
    twin = copy.deepcopy(model)
    make = lambda m: SNRAdamW(m.parameters(), lr=1e-2, backend=backend, state_dtype=torch.uint8)  # noqa: E731
    opt = make(model)
    data = [torch.randn(16, 20).to(DEVICE) for _ in range(6)]

    def train(m, o, batches):
        for x in batches:
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()

    train(model, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin.load_state_dict(saved["model"])
    twin_opt = make(twin)
    twin_opt.load_state_dict(saved["opt"])
    train(model, opt, data[3:])
    train(twin, twin_opt, data[3:])
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
        for key, value in opt.state[a].items():
            assert torch.equal(value, twin_opt.state[b][key]), key


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_float_state_checkpoints_load_into_8bit_states_and_back(state_dtype):
    torch.manual_seed(4)
    p = torch.nn.Parameter(torch.randn(700))
    opt = SNRAdamW([p], lr=1e-2, state_dtype=state_dtype)
    for _ in range(3):
        p.grad = torch.randn(700)
        opt.step()
    coded = SNRAdamW([p], lr=1e-2, state_dtype=torch.uint8)
    coded.load_state_dict(opt.state_dict())
    for key in KEYS:  # encoded: the nearest codes of the float states
        codes, scales, _ = reference.encode_8bit(opt.state[p][key].double(), SIGNED[key])
        assert torch.equal(coded.state[p][key + "_scales"], scales)
        assert (coded.state[p][key + "_codes"] != codes).sum() <= 1
    assert coded.state[p]["step"] == 3
    back = SNRAdamW([p], lr=1e-2, state_dtype=torch.float32)
    back.load_state_dict(coded.state_dict())
    for key in KEYS:  # decoded: code value times scale, rounded once to float32
        codes, scales = coded.state[p][key + "_codes"], coded.state[p][key + "_scales"]
        exact = codebook.table(SIGNED[key]).double()[codes.long()] * scales.double().repeat_interleave(256)[:700]
        assert torch.equal(back.state[p][key], exact.float())


def test_an_adamw_checkpoint_loads_into_8bit_states():
    torch.manual_seed(5)
    p = torch.nn.Parameter(torch.randn(500))
    adamw = torch.optim.AdamW([p], lr=1e-2, betas=(0.8, 0.99))
    for _ in range(4):
        p.grad = torch.randn(500)
        adamw.step()
    opt = SNRAdamW([p], lr=1e-2, betas=(0.8, 0.99), rho=0.9, state_dtype=torch.uint8)
    opt.load_state_dict(adamw.state_dict())
    m, v = adamw.state[p]["exp_avg"].double(), adamw.state[p]["exp_avg_sq"].double()
    mhat, vhat = m / (1 - 0.8**4), v / (1 - 0.99**4)  # ALGORITHM.md: s-hat = max(v-hat - m-hat^2, 0)
    s = torch.clamp(vhat - mhat**2, min=0) * (1 - 0.9**4)
    for key, x in (("exp_avg", m), ("exp_avg_sq", v), ("exp_grad_var", s)):
        codes, scales, _ = reference.encode_8bit(x, SIGNED[key])
        assert (opt.state[p][key + "_codes"] != codes).sum() <= 1, key
        torch.testing.assert_close(opt.state[p][key + "_scales"], scales, rtol=2**-23, atol=0)


def test_8bit_states_take_about_three_bytes_per_param():
    torch.manual_seed(16)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
    opt = SNRAdamW(model.parameters(), state_dtype=torch.uint8)
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    stored = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k != "step")
    assert stored / n <= 3.1
    assert stored == sum(3 * p.numel() + 3 * 4 * -(-p.numel() // 256) for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS_8BIT)
def test_a_skipped_step_changes_no_code_or_scale(backend):
    torch.manual_seed(18)
    p = torch.nn.Parameter(torch.randn(600, device=DEVICE))
    opt = SNRAdamW([p], backend=backend, state_dtype=torch.uint8, track_stats=True)
    for k in range(2):
        p.grad = torch.randn(600, device=DEVICE)
        opt.step()
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.randn(600, device=DEVICE)
    opt.step(grad_scale=torch.tensor(2.0, device=DEVICE), found_inf=torch.tensor(1.0, device=DEVICE))
    assert torch.equal(p.detach(), before[0])
    for key, value in before[1].items():
        assert torch.equal(opt.state[p][key], value), key
    assert opt.stats()["skipped_steps"] == 1 and math.isnan(opt.stats()["mean_gate"])


@pytest.mark.parametrize("backend", BACKENDS_8BIT)
def test_gate_stats_with_8bit_states_are_the_references(backend):
    gen = torch.Generator().manual_seed(6)
    p = torch.nn.Parameter(torch.randn(900, generator=gen).to(DEVICE))
    opt = SNRAdamW([p], backend=backend, state_dtype=torch.uint8, track_stats=True, **HP)
    for t in range(3):
        g = torch.randn(900, generator=gen).to(DEVICE) + 0.3
        st = _coded_reference_state(opt, p) if t else reference.new_state(p)
        p.grad = g
        opt.step()
        out = reference.reference_step(p.detach().clone(), g, st, **HP, state_dtype=torch.uint8)
    stats = opt.stats()
    assert stats["mean_gate"] == pytest.approx(float(out["q"].mean()), rel=1e-5)
    assert stats["signal"] == pytest.approx(float((out["mhat"] ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS_8BIT)
def test_clipping_in_the_step_with_8bit_states_equals_clip_grad_norm_then_a_step(backend):
    torch.manual_seed(7)
    model = torch.nn.Linear(40, 30).to(DEVICE)
    twin = copy.deepcopy(model)
    opt = SNRAdamW(model.parameters(), lr=1e-2, backend=backend, state_dtype=torch.uint8, max_grad_norm=0.1)
    twin_opt = SNRAdamW(twin.parameters(), lr=1e-2, backend=backend, state_dtype=torch.uint8)
    for k in range(3):
        x = torch.randn(8, 40).to(DEVICE)
        for m in (model, twin):
            m.zero_grad()
            m(x).pow(2).sum().backward()
        norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
        assert norm > 0.1  # clipping is active
        opt.step()
        twin_opt.step()
        torch.testing.assert_close(opt.last_grad_norm(), norm, rtol=1e-6, atol=0)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        for key in KEYS:
            codes, twin_codes = opt.state[a][key + "_codes"], twin_opt.state[b][key + "_codes"]
            assert (codes != twin_codes).sum() <= 2 and torch.all((codes.long() - twin_codes.long()).abs() <= 1)


def test_tensors_larger_than_one_eager_piece_are_encoded_in_whole_blocks():
    from snr_triton.backend import eager

    n = eager.PIECE + 300  # two pieces; the second ends in a short block
    gen = torch.Generator().manual_seed(8)
    p = torch.nn.Parameter(torch.randn(n, generator=gen))
    opt = SNRAdamW([p], backend="eager", state_dtype=torch.uint8, **HP)
    ref_p = p.detach().clone()
    st = reference.new_state(p)
    g = torch.randn(n, generator=gen)
    p.grad = g
    opt.step()
    reference.reference_step(ref_p, g, st, **HP, state_dtype=torch.uint8)
    for key in KEYS:
        torch.testing.assert_close(opt.state[p][key + "_scales"], st[key + "_scales"], rtol=2.0**-22, atol=0)
        assert (opt.state[p][key + "_codes"] != st[key + "_codes"]).sum() <= n * 1e-3
    torch.testing.assert_close(p.detach(), ref_p, rtol=2.0**-22, atol=1e-5 * HP["lr"])  # both round to float32


def test_complex_and_transposed_params_step_like_their_real_memory():
    """Blocks run over a state's memory order, which is its param's: a transposed param's states
    are its real memory's, and a complex param's those of its real view."""
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(30, 40, generator=gen)
    transposed = torch.nn.Parameter(base.clone().t())  # memory order: base's
    flat = torch.nn.Parameter(base.clone().reshape(-1))
    cplx = torch.nn.Parameter(torch.view_as_complex(base.clone().reshape(600, 2)))
    opts = [SNRAdamW([q], state_dtype=torch.uint8, **HP) for q in (transposed, flat, cplx)]
    for _ in range(3):
        g = torch.randn(30, 40, generator=gen)
        transposed.grad, flat.grad = g.t().clone(), g.reshape(-1).clone()
        cplx.grad = torch.view_as_complex(g.reshape(600, 2).clone())
        for o in opts:
            o.step()
    assert torch.equal(transposed.detach().t().reshape(-1), flat.detach())
    assert torch.equal(torch.view_as_real(cplx.detach()).reshape(-1), flat.detach())
    for key in KEYS:
        want = opts[1].state[flat][key + "_codes"]
        assert torch.equal(codebook.flat(opts[0].state[transposed][key + "_codes"]), want)
        assert torch.equal(opts[2].state[cplx][key + "_codes"].reshape(-1), want)
        assert torch.equal(opts[0].state[transposed][key + "_scales"], opts[1].state[flat][key + "_scales"])


def test_decoded_state_is_the_float_value_of_the_codes():
    torch.manual_seed(17)
    p = torch.nn.Parameter(torch.randn(10, 30))
    opt = SNRAdamW([p], state_dtype=torch.uint8)
    with pytest.raises(KeyError) as e:
        opt.decoded_state(p)
    assert e.value.args[0] == ("decoded_state(): this param has no states of this optimizer (no step taken since "
                               "it was added, or its state was edited: the next step adopts it)")
    p.grad = torch.randn(10, 30)
    opt.step()
    for edit in ("a key replaced", "the entry replaced"):  # not decoded from states the next step may not keep
        q = torch.nn.Parameter(p.detach().clone())
        twin = SNRAdamW([q], state_dtype=torch.uint8)
        q.grad = torch.randn(10, 30)
        twin.step()
        twin.decoded_state(q)
        if edit == "a key replaced":
            twin.state[q]["exp_avg_scales"] = twin.state[q]["exp_avg_scales"] * 2
        else:
            twin.state[q] = dict(twin.state[q])
        with pytest.raises(KeyError, match="state was edited"):
            twin.decoded_state(q)
        q.grad = torch.randn(10, 30)
        twin.step()
        assert twin.decoded_state(q)["step"] == 2  # adopted by the next step
    decoded = opt.decoded_state(p)
    for key in KEYS:
        codes, scales = opt.state[p][key + "_codes"], opt.state[p][key + "_scales"]
        exact = codebook.table(SIGNED[key]).double()[codes.long().reshape(-1)] * scales.double().repeat_interleave(256)[:300]
        assert decoded[key].shape == p.shape and torch.equal(decoded[key].reshape(-1), exact.float())
    assert decoded["step"] == 1


def test_bad_state_dtypes_and_bad_8bit_checkpoints_are_refused_and_change_nothing():
    torch.manual_seed(19)
    p = torch.nn.Parameter(torch.randn(300))
    with pytest.raises(ValueError, match=r"state_dtype must be one of .*torch\.uint8"):
        SNRAdamW([p], state_dtype=torch.int8)
    opt = SNRAdamW([p], state_dtype=torch.uint8)
    p.grad = torch.randn(300)
    opt.step()
    saved = opt.state_dict()
    before = copy.deepcopy(saved)
    for key, bad, match in (("exp_avg_codes", torch.zeros(300, dtype=torch.int8), "dense uint8"),
                            ("exp_avg_codes", torch.zeros(301, dtype=torch.uint8),  # dense, another shape
                             r"dense uint8 tensor of its param's shape \(300,\), got torch.uint8 \(301,\)"),
                            ("exp_avg_scales", torch.zeros(3), r"float32 of shape \(2,\)"),
                            ("exp_avg_sq_scales", None, "must be a tensor .*, got NoneType"),
                            ("exp_avg_sq_codes", [0] * 300, "must be a tensor .*, got list"),
                            ("exp_grad_var_scales", "deleted", "must be a tensor .*, got NoneType")):  # codes alone
        broken = copy.deepcopy(saved)
        if isinstance(bad, str):
            del broken["state"][0][key]
        else:
            broken["state"][0][key] = bad
        with pytest.raises(ValueError, match=f"state '{key}' of param 0 .*{match}"):
            opt.load_state_dict(broken)
        after = opt.state_dict()
        for k, v in before["state"][0].items():
            assert torch.equal(after["state"][0][k], v)


def test_a_checkpoint_of_another_layout_is_decoded_in_its_blocks_and_encoded_in_ours():
    """Blocks run over memory order, so codes saved for a transposed param do not fit a contiguous
    one bit for bit: they are decoded in the saved layout and encoded again in the new one."""
    gen = torch.Generator().manual_seed(13)
    rows = torch.logspace(-4, 2, 40)[:, None]  # blocks of very different scales
    transposed = torch.nn.Parameter((torch.randn(40, 64, generator=gen) * rows).t())
    opt = SNRAdamW([transposed], state_dtype=torch.uint8, lr=1e-3)
    for _ in range(2):
        transposed.grad = (torch.randn(40, 64, generator=gen) * rows).t()
        opt.step()
    saved = opt.state_dict()
    contiguous = torch.nn.Parameter(transposed.detach().contiguous())
    other = SNRAdamW([contiguous], state_dtype=torch.uint8, lr=1e-3)
    other.load_state_dict(saved)
    for key in KEYS:
        decoded = opt.decoded_state(transposed)[key]
        codes, scales, _ = reference.encode_8bit(decoded.contiguous().double(), SIGNED[key])
        assert torch.equal(other.state[contiguous][key + "_scales"], scales)
        assert (other.state[contiguous][key + "_codes"] != codes).sum() <= 2


def test_a_dtensor_param_with_8bit_states_steps_as_its_local_shard_and_shows_its_scales_per_rank(tmp_path):
    """FSDP2 / tensor-parallel params (a one-rank process group in this process; two ranks in
    tests/test_distributed.py): the codes are a DTensor like the param, the scales one row per rank,
    the values those of a plain param; switching state_dtype later migrates them; a checkpoint's
    scales that are not laid out so are refused by name."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        gen = torch.Generator().manual_seed(3)
        full, grads = torch.randn(40, 16, generator=gen), [torch.randn(40, 16, generator=gen) for _ in range(3)]
        z, zgrads = torch.randn(6, 5, 2, generator=gen), [torch.randn(6, 5, 2, generator=gen) for _ in range(3)]
        p = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)]))
        c = torch.nn.Parameter(distribute_tensor(torch.view_as_complex(z.clone()), mesh, [Shard(0)]))
        plain, plain_c = torch.nn.Parameter(full.clone()), torch.nn.Parameter(torch.view_as_complex(z.clone()))
        opt = SNRAdamW([p, c], state_dtype=torch.uint8, **HP)
        twin = SNRAdamW([plain, plain_c], state_dtype=torch.uint8, **HP)
        for g, zg in zip(grads, zgrads):
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            c.grad = distribute_tensor(torch.view_as_complex(zg.clone()), mesh, [Shard(0)])
            plain.grad, plain_c.grad = g.clone(), torch.view_as_complex(zg.clone())
            opt.step()
            twin.step()
        assert torch.equal(p.detach().full_tensor(), plain.detach())
        assert torch.equal(c.detach().full_tensor(), plain_c.detach())
        codes = opt.state[c]["exp_avg_codes"]  # a complex param's codes: its real view, (..., 2)
        assert codes.shape == (6, 5, 2) and torch.equal(codes.full_tensor(), twin.state[plain_c]["exp_avg_codes"])
        for key in KEYS:
            codes, scales = opt.state[p][key + "_codes"], opt.state[p][key + "_scales"]
            assert isinstance(codes, DTensor) and codes.placements == p.placements
            assert torch.equal(codes.full_tensor(), twin.state[plain][key + "_codes"])
            assert isinstance(scales, DTensor) and scales.shape == (1, 3)  # 640 elements: 3 blocks
            assert torch.equal(scales.to_local()[0], twin.state[plain][key + "_scales"])
        saved = opt.state_dict()
        bad = {**saved["state"][0], "exp_avg_scales": twin.state[plain]["exp_avg_scales"][:2]}
        before = opt.state_dict()
        with pytest.raises(ValueError, match=r"'exp_avg_scales'.*float32 of shape laid out by scales_layout, \(1, 3\)"):
            opt.load_state_dict({**saved, "state": {**saved["state"], 0: bad}})
        after = opt.state_dict()
        assert all(torch.equal(local(after["state"][0][k]), local(v)) for k, v in before["state"][0].items())
        opt.param_groups[0]["state_dtype"] = torch.bfloat16  # decoded at the next step, as for a plain param
        twin.param_groups[0]["state_dtype"] = torch.bfloat16
        p.grad = distribute_tensor(grads[0].clone(), mesh, [Shard(0)])
        c.grad = distribute_tensor(torch.view_as_complex(zgrads[0].clone()), mesh, [Shard(0)])
        plain.grad, plain_c.grad = grads[0].clone(), torch.view_as_complex(zgrads[0].clone())
        opt.step()
        twin.step()
        assert torch.equal(opt.state[p]["exp_avg"].full_tensor(), twin.state[plain]["exp_avg"])
        assert torch.equal(p.detach().full_tensor(), plain.detach())
        shown = opt.state[c]["exp_avg"]  # bf16 states of a complex param: the real view too
        assert shown.shape == (6, 5, 2) and torch.equal(shown.full_tensor(), twin.state[plain_c]["exp_avg"])
    finally:
        dist.destroy_process_group()


SR_BACKENDS = [b for b in BACKENDS_8BIT if get(b).unavailable_reason(
    torch.device(DEVICE), torch.bfloat16, Hyper.of({**DEFAULTS, **RUNTIME_DEFAULTS, "state_dtype": torch.uint8,
                                                    "stochastic_rounding": True})) is None]


@pytest.mark.parametrize("backend", SR_BACKENDS)
def test_stochastic_rounding_of_bf16_params_with_8bit_states(backend):
    """bf16 params rounded stochastically (each within one bf16 ulp of the float64 reference's
    value, not always the nearest), states encoded as without it."""
    gen = torch.Generator().manual_seed(14)
    p = torch.nn.Parameter(torch.randn(2048, generator=gen).to(DEVICE, torch.bfloat16))
    opt = SNRAdamW([p], backend=backend, state_dtype=torch.uint8, stochastic_rounding=True, **HP)
    not_nearest = 0
    for t in range(3):
        g = (torch.randn(2048, generator=gen) * 0.1).to(DEVICE, torch.bfloat16)
        st = _coded_reference_state(opt, p) if t else reference.new_state(p)
        exact = p.detach().double().clone()
        p.grad = g
        opt.step()
        reference.reference_step(exact, g, st, **HP, state_dtype=torch.uint8)  # float64 param: unrounded
        ulp = torch.finfo(torch.bfloat16).eps * exact.abs()
        assert torch.all((p.detach().double() - exact).abs() <= ulp)
        not_nearest += int((p.detach() != exact.to(torch.bfloat16)).sum())
        for key in KEYS:
            assert (opt.state[p][key + "_codes"] != st[key + "_codes"]).sum() <= 4
    assert not_nearest > 100  # rounded stochastically, not to nearest


@pytest.mark.parametrize("backend", BACKENDS_8BIT)
def test_exp_grad_var_deleted_by_hand_is_derived_from_the_codes_of_m_and_v(backend):
    """A user resets s alone (del of its codes and scales): as for an AdamW checkpoint, the next
    step derives it from m and v, here the values of their codes, which stay as they were. The
    truth: float32 states holding those values and ALGORITHM.md's s (s-hat = max(v-hat - m-hat^2,
    0)) computed here, stepped with the same grad; ours differ by the encoding of the derived s and
    of the stepped states. Steps of small grads, then a large one: s then differs from its value
    derived from m and v."""
    gen = torch.Generator().manual_seed(12)
    init = torch.randn(600, generator=gen)
    hp = dict(lr=1e-2, betas=(0.8, 0.95), rho=0.9, gate="snr", alpha=0.7, backend=backend)
    p = torch.nn.Parameter(init.clone().to(DEVICE))
    opt = SNRAdamW([p], state_dtype=torch.uint8, **hp)
    for size in (0.01, 0.01, 1.0):
        p.grad = size * torch.randn(600, generator=gen).to(DEVICE)
        opt.step()
    values = opt.decoded_state(p)
    t, (b1, b2), rho = 3, hp["betas"], hp["rho"]
    mhat, vhat = values["exp_avg"].double() / (1 - b1**t), values["exp_avg_sq"].double() / (1 - b2**t)
    derived = (torch.clamp(vhat - mhat * mhat, min=0) * (1 - rho**t)).float()
    assert (derived - values["exp_grad_var"]).abs().max() > 0.5 * derived.abs().max()  # a reset that shows
    q = torch.nn.Parameter(p.detach().clone())
    twin = SNRAdamW([q], state_dtype=torch.float32, **hp)
    twin.state[q] = {"step": values["step"].clone(), "exp_avg": values["exp_avg"].clone(),
                     "exp_avg_sq": values["exp_avg_sq"].clone(), "exp_grad_var": derived}
    del opt.state[p]["exp_grad_var_codes"], opt.state[p]["exp_grad_var_scales"]
    g = torch.randn(600, generator=gen).to(DEVICE)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    twin.step()
    ours, truth = opt.decoded_state(p), twin.state[q]
    assert ours["step"].item() == truth["step"].item() == 4
    for key in KEYS:  # within the 8-bit map's spacing near each block's absmax (1/32 suffices)
        scale = truth[key].abs().max().item()
        assert (ours[key] - truth[key]).abs().max().item() <= scale / 32, key
    assert (p.detach() - q.detach()).abs().max().item() <= 1e-2 * hp["lr"]
    assert (p.detach() - init.to(DEVICE)).abs().max().item() > 10 * hp["lr"] * 1e-2


ACTIONS_8BIT = ["step", "delete_state", "no_grad", "reload", "resize", "grads_in_place", "freeze", "clear_state",
                "new_data", "lr_change"]


@settings(max_examples=15, deadline=None)
@given(actions=st.lists(st.tuples(st.sampled_from(ACTIONS_8BIT), st.integers(0, 1)), min_size=2, max_size=10),
       seed=st.integers(0, 2**16),
       gate=st.sampled_from(["snr", "soft", "none"]))
def test_what_users_do_between_steps_with_8bit_states_agrees_across_backends_and_with_the_reference(
        actions, seed, gate):
    """States deleted or cleared, params frozen, resized or given new data, grads written in place, a
    checkpoint round trip, the lr halved, between steps: every backend steps alike (to float32
    rounding) and within a fraction of one step's lr of the float64 reference, which starts a param
    afresh wherever its state was dropped. A param stepping on with states it no longer shows is
    off by about lr."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(n, generator=gen) for n in (300, 7)]
    hp = {**HP, "gate": gate}
    runs = {}
    for b in BACKENDS_8BIT:
        ps = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in init]
        runs[b] = ps, SNRAdamW(ps, backend=b, state_dtype=torch.uint8, **hp)
    refs = [t.double() for t in init]
    states = [reference.new_state(t) for t in refs]
    lr, frozen, in_place = hp["lr"], [False, False], False
    for action, t in actions + [("step", 0)]:
        if action == "delete_state":
            for ps, opt in runs.values():
                opt.state.pop(ps[t], None)
            states[t] = reference.new_state(refs[t])
        elif action == "clear_state":
            for _, opt in runs.values():
                opt.state.clear()
            states = [reference.new_state(r) for r in refs]
        elif action == "reload":
            for _, opt in runs.values():
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                buffer.seek(0)
                opt.load_state_dict(torch.load(buffer, weights_only=True))
        elif action in ("resize", "new_data"):
            fresh = torch.randn(int(torch.randint(1, 40, (1,), generator=gen)) if action == "resize" else
                                refs[t].numel(), generator=gen)
            for ps, opt in runs.values():
                ps[t].data = fresh.clone().to(DEVICE)
                if action == "resize":  # AdamW cannot go on without a fresh state either
                    opt.state.pop(ps[t], None)
                    ps[t].grad = None
            refs[t] = fresh.double()
            if action == "resize":
                states[t] = reference.new_state(refs[t])
        elif action == "freeze":
            frozen[t] = not frozen[t]
        elif action == "grads_in_place":
            in_place = not in_place
        elif action == "lr_change":
            for _, opt in runs.values():
                opt.param_groups[0]["lr"] *= 0.5
            lr *= 0.5
        grads = [None if frozen[i] or (action == "no_grad" and i == t) else torch.randn(refs[i].shape, generator=gen)
                 for i in range(2)]
        for ps, opt in runs.values():
            for p, g in zip(ps, grads):
                if g is not None and in_place and p.grad is not None and p.grad.shape == g.shape:
                    p.grad.copy_(g)
                else:
                    p.grad = None if g is None else g.clone().to(DEVICE)
            opt.step()
        for i, g in enumerate(grads):
            if g is not None:
                reference.reference_step(refs[i], g.double(), states[i], **{**hp, "lr": lr}, state_dtype=torch.uint8)
        first = runs[BACKENDS_8BIT[0]][0]
        for b, (ps, _) in runs.items():
            for i in range(2):
                ours = ps[i].detach().cpu().double()
                assert (ours - first[i].detach().cpu().double()).abs().max() <= 1e-6, (b, i, action)
                assert (ours - refs[i]).abs().max() <= 0.3 * hp["lr"], (b, i, action)
