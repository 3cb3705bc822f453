"""The kernel contract is written once (snr_triton/contract.py) and every copy agrees with it;
the backend registry chooses as documented."""

import warnings

import pytest
import torch

from conftest import TRITON
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


def test_auto_warns_once_when_it_falls_back_for_a_broken_fused_kernel(monkeypatch):
    def broken():
        raise RuntimeError("the fused CPU kernel is unavailable: no C compiler found")

    monkeypatch.setattr(cpu, "load_library", broken)
    monkeypatch.setattr(backend, "_warned", set())
    with pytest.warns(UserWarning, match="eager backend, several times slower than the fused cpu kernel, "
                                         "because the fused CPU kernel is unavailable: no C compiler"):
        opt = SNRAdamW([torch.nn.Parameter(torch.ones(3))])
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
