"""The kernel contract is written once (snr_triton/contract.py) and every copy agrees with it;
the backend registry chooses as documented."""

import warnings

import pytest
import torch

from conftest import TRITON, warned_from
from snr_triton import SNRAdamW, backend, contract
from snr_triton.backend import cpu
from snr_triton.hyperparams import DEFAULT_HYPER, GATES


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
def test_triton_kernel_constants_are_the_contract():
    from snr_triton.backend.triton import kernel_module

    km = kernel_module()
    for name, i in contract.GATE_IDS.items():
        assert getattr(km, f"GATE_{name.upper()}").value == i
    columns = {"PARAM_ADDR": "param_addr", "GRAD_ADDR": "grad_addr", "EXP_AVG_ADDR": "exp_avg_addr",
               "EXP_AVG_SQ_ADDR": "exp_avg_sq_addr", "EXP_GRAD_VAR_ADDR": "exp_grad_var_addr", "NUMEL": "numel",
               "FIRST_BLOCK": "first_block", "STEP_SLOT": "step_slot", "RNG_SEED": "rng_seed", "ALIGNED": "aligned"}
    for const, column in columns.items():
        assert getattr(km, const).value == contract.ROW.index(column)
    assert km.ROW_COLUMNS.value == len(contract.ROW) and km.STAT_COLUMNS.value == len(contract.STATS)


def test_states_are_the_params_own_and_aligned_for_the_fast_path():
    """Each param's states are tensors of its own size (torch.save of one entry writes that
    entry), laid out like the param, and start on 16 bytes (the kernels' unmasked path)."""
    from snr_triton.param_states import BucketStates

    params = [torch.zeros(n) for n in (1, 17, 0, 33)] + [torch.zeros(3, 5).t()]
    bucket = BucketStates({}, torch.device("cpu"), torch.float32, torch.float32)
    for i, p in enumerate(params):
        slot = bucket.new_slot(p, i)
        for t in slot.real:
            assert t.untyped_storage().nbytes() == p.numel() * 4 and t.stride() == p.stride()
            assert t.data_ptr() % 16 == 0 or p.numel() == 0


def test_the_aligned_column_marks_rows_whose_param_grad_and_states_all_start_on_16_bytes():
    """The kernels take their unmasked 128-bit path only for rows marked aligned: every aligned
    row is marked, and a row is unmarked when its param, its grad, a state handed in by the
    compiler or one of its own states starts off 16 bytes (4 bytes off here, so a test of
    `& 16` instead of `& 15` is seen; numels of 17 so a test that reads numel is seen)."""
    from snr_triton.param_states import BucketStates
    from snr_triton.tables import ALIGNED, block_map

    def off(n):  # a float32 tensor starting 4 bytes past a 64-byte-aligned allocation
        return torch.zeros(n + 1)[1:]

    params = [torch.zeros(17) for _ in range(4)]
    bucket = BucketStates({}, torch.device("cpu"), torch.float32, torch.float32)
    slots = [bucket.new_slot(p, i) for i, p in enumerate(params)]
    grads = [torch.zeros(17) for _ in params]
    table = block_map(bucket, list(range(4)), 8)
    assert table.states_aligned and bool(table.static_aligned.all())

    def marks(ps, gs, states=None):
        table.refresh([a for p, g in zip(ps, gs) for a in (p.data_ptr(), g.data_ptr())], states)
        return table.rows[:, ALIGNED].tolist()

    assert marks(params, grads) == [1, 1, 1, 1]
    assert marks([params[0], off(17), *params[2:]], grads) == [1, 0, 1, 1]
    assert marks(params, [*grads[:3], off(17)]) == [1, 1, 1, 0]
    handed = [t.data_ptr() for slot in slots for t in slot.real]
    handed[3 * 2 + 2] += 4  # row 2's exp_grad_var, handed in by the compiler
    assert marks(params, grads, handed) == [1, 1, 0, 1]
    handed[3 * 2 + 2] -= 4  # aligned states handed in: an unaligned param still unmarks its row
    assert marks([params[0], off(17), *params[2:]], grads, handed) == [1, 0, 1, 1]
    assert marks(params, grads) == [1, 1, 1, 1]  # back on the slots' own states

    # one of a row's own states off 16 bytes (not something our allocations do): that row only
    slots[1].real = (*slots[1].real[:2], off(17))
    bucket.maps.clear()
    table = block_map(bucket, list(range(4)), 8)
    assert not table.states_aligned and table.static_aligned.tolist() == [True, False, True, True]
    assert marks(params, grads) == [1, 0, 1, 1]


def test_the_stats_buffer_is_made_once_per_dtype():
    """Made on first use and reused every step (no allocation in a step), remade for another dtype."""
    from snr_triton.param_states import BucketStates
    from snr_triton.tables import block_map

    bucket = BucketStates({}, torch.device("cpu"), torch.float32, torch.float32)
    bucket.new_slot(torch.zeros(40), 0)
    table = block_map(bucket, [0], 16)
    first = table.partial_sums(torch.float32)
    assert first.shape == (3, len(contract.STATS)) and not first.any()
    assert table.partial_sums(torch.float32) is first
    other = table.partial_sums(torch.float64)
    assert other.dtype == torch.float64 and other.shape == first.shape


def test_gate_names_are_the_contract():
    assert set(GATES) == set(contract.GATE_IDS)


def test_registry_order_and_auto():
    assert backend.ORDER == ("triton", "cpu", "eager")
    cpu_param = torch.device("cpu")
    fused = "cpu" if cpu.unavailable_reason(cpu_param, torch.float32, DEFAULT_HYPER) is None else "eager"
    assert backend.choose("auto", cpu_param, torch.float32, DEFAULT_HYPER)[0] == fused
    # float64 is served by no fused kernel; Triton on a CPU (interpreted) is never auto's choice
    assert backend.choose("auto", cpu_param, torch.float64, DEFAULT_HYPER)[0] == "eager"
    with pytest.raises(RuntimeError, match="backend='cpu' cannot step a torch.float64"):
        backend.choose("cpu", cpu_param, torch.float64, DEFAULT_HYPER)


def test_an_unknown_backend_or_kernel_file_is_refused_by_name():
    choices = "backend must be one of 'triton', 'cpu', 'eager'; got 'tpu'"
    with pytest.raises(ValueError) as e:
        backend.get("tpu")
    assert str(e.value) == choices
    with pytest.raises(ValueError) as e:
        backend.choose("tpu", torch.device("cpu"), torch.float32, DEFAULT_HYPER)
    assert str(e.value) == choices
    with pytest.raises(FileNotFoundError) as e:
        backend.kernel_file("snr_adamw_npu.c")
    assert str(e.value) == "kernels/snr_adamw_npu.c is missing: reinstall snr-triton"


@pytest.mark.parametrize("layout", ["installed", "source checkout", "both"])
def test_kernel_sources_are_found_in_the_wheel_before_the_checkout(tmp_path, monkeypatch, layout):
    """An installed wheel has the kernels at snr_triton/kernels/ (the build maps kernels/ there); a
    source checkout has them at the top-level kernels/ beside the package. The package's own copy
    wins: a site-packages/kernels/ of another project must not be read."""
    site = tmp_path / "site-packages"
    (site / "snr_triton" / "backend").mkdir(parents=True)
    places = {"installed": site / "snr_triton" / "kernels", "source checkout": site / "kernels"}
    for where, folder in places.items():
        if layout in (where, "both"):
            folder.mkdir()
            (folder / "snr_adamw_cpu.c").write_text(where)
    monkeypatch.setattr(backend, "__file__", str(site / "snr_triton" / "backend" / "__init__.py"))
    found = backend.kernel_file("snr_adamw_cpu.c")
    assert found.read_text() == ("source checkout" if layout == "source checkout" else "installed")
    with pytest.raises(FileNotFoundError, match="kernels/snr_adamw.py is missing: reinstall snr-triton"):
        backend.kernel_file("snr_adamw.py")


def test_a_backend_is_imported_once_then_looked_up(monkeypatch):
    """get() is a dict lookup after the first import: it runs inside the compiled step, where
    importlib would break the graph."""
    import importlib

    first = backend.get("eager")

    def refuse(name, *args):
        raise AssertionError(f"imported {name} again")

    monkeypatch.setattr(importlib, "import_module", refuse)
    assert backend.get("eager") is first


def test_auto_with_no_backend_for_a_dtype_says_so_and_available_lists_only_servers():
    cpu_device = torch.device("cpu")
    with pytest.raises(RuntimeError) as e:
        backend.choose("auto", cpu_device, torch.int32, DEFAULT_HYPER)
    assert str(e.value) == "no backend can step a torch.int32 param on cpu"
    assert backend.available(cpu_device, torch.int32, DEFAULT_HYPER) == []
    half = backend.available(cpu_device, torch.float16, DEFAULT_HYPER)
    assert "eager" in half and "cpu" not in half  # the C kernel serves float32 and bfloat16 only
    if cpu.unavailable_reason(cpu_device, torch.float32, DEFAULT_HYPER) is None:
        assert "cpu" in backend.available(cpu_device, torch.float32, DEFAULT_HYPER)


def test_auto_warns_once_when_it_falls_back_for_a_broken_fused_kernel(monkeypatch):
    def broken():
        raise RuntimeError("the fused CPU kernel is unavailable: no C compiler found")

    monkeypatch.setattr(cpu, "load_library", broken)
    monkeypatch.setattr(backend, "_warned", set())
    with pytest.warns(UserWarning, match="eager backend, several times slower than the fused cpu kernel, "
                                         "because the fused CPU kernel is unavailable: no C compiler") as said:
        opt = SNRAdamW([torch.nn.Parameter(torch.ones(3))])
    assert warned_from(said, __file__) == [__file__]  # it points at the line that made the optimizer
    monkeypatch.setattr(backend, "_warned", set())
    with pytest.warns(UserWarning, match="several times slower") as said:
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
    assert warned_from(said, __file__) == [__file__]  # and at add_param_group's, one frame less deep
    assert opt.backend_of(opt.param_groups[0]["params"][0]) == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: a second optimizer, or a step, says nothing more
        SNRAdamW([torch.nn.Parameter(torch.ones(3))])
    # what the C kernel would not serve anyway (float64) falls back without a word
    monkeypatch.setattr(backend, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SNRAdamW([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))])


def test_a_backend_that_cannot_import_is_a_degraded_choice_for_auto(monkeypatch):
    """`auto` imports every backend: one that cannot import here (fcntl on Windows, a broken
    install) must make auto fall back with its warning, not raise ModuleNotFoundError."""
    import importlib

    real = importlib.import_module

    def no_cpu(name, *args):
        if name.endswith("backend.cpu"):
            raise ModuleNotFoundError("No module named 'fcntl'")
        return real(name, *args)

    monkeypatch.setattr(backend, "_modules", {k: v for k, v in backend._modules.items() if k != "cpu"})
    monkeypatch.setattr(importlib, "import_module", no_cpu)
    monkeypatch.setattr(backend, "_warned", set())
    with pytest.warns(UserWarning, match="the cpu backend cannot be imported here"):
        assert backend.choose("auto", torch.device("cpu"), torch.float32, DEFAULT_HYPER)[0] == "eager"
    with pytest.raises(RuntimeError, match="backend='cpu' cannot step.*cannot be imported"):
        backend.choose("cpu", torch.device("cpu"), torch.float32, DEFAULT_HYPER)
