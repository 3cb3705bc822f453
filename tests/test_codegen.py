"""The Triton kernel compiles for real GPUs (sm_80, sm_90) on this CPU machine, with the
signature the host launch path really uses: no spills, and the unmasked hot path reads and
writes every stream (theta, g, m, v, s) with 128-bit accesses. Every code path is covered: each
dtype pair x gate, plain and with every option on (`snr-triton codegen --variants paths`).

The compiles run in subprocesses (one per arch, in parallel): this test session runs the kernel
under Triton's interpreter, which patches triton.language and breaks a later compile."""

import json
import os
import subprocess
import sys

import pytest

from conftest import TRITON

pytestmark = pytest.mark.skipif(not TRITON, reason="Triton is not installed")

from snr_triton import codegen  # noqa: E402
from snr_triton.backend.triton import BLOCK, NUM_WARPS  # noqa: E402

ARCHS = (80, 90)
VARIANTS = {v.name: v for v in codegen.variants("paths")}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("codegen")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {arch: subprocess.Popen([sys.executable, "-m", "snr_triton.cli", "codegen", "--variants", "paths",
                                     "--arch", str(arch), "--json", str(out / f"{arch}.json")],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in ARCHS}
    results = []
    for arch, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        assert (out / f"{arch}.json").exists(), stderr[-3000:]
        results += json.loads((out / f"{arch}.json").read_text())
    return results


def test_every_code_path_compiles_for_every_arch(reports):
    assert len(VARIANTS) == 3 * 3 * 4 * 2  # param dtype x state dtype (fp32, bf16, 8-bit) x gate x (plain, all options)
    assert sorted((r["variant"], r["arch"]) for r in reports) == sorted((v, a) for v in VARIANTS for a in ARCHS)


def test_no_register_spills(reports):
    """No local memory for spills. (ptxas may keep the IEEE sqrt's slow path, taken only for
    denormal and special inputs, as an out-of-line call with an 8-byte frame: reported as stack.)"""
    assert [r for r in reports if r["spills"]] == []
    assert all(r["stack"] <= 8 for r in reports)


def test_hot_path_is_full_width_on_every_stream(reports):
    for r in reports:
        loads, stores = codegen.expected_wide_accesses(VARIANTS[r["variant"]], BLOCK, NUM_WARPS)
        assert loads > 0 and stores > 0  # BLOCK and num_warps give each thread >= 16 bytes a stream
        assert (r["loads_128"], r["stores_128"]) == (loads, stores), r


def test_signature_is_captured_from_the_launch_path():
    args, kwargs = codegen.capture_launch(codegen.Variant("bf16", "fp32", "snr", lr_tensor=True))
    names = ["meta_ptr", "block_tensor_ptr", "exp_avg_ptr", "exp_avg_sq_ptr", "exp_grad_var_ptr", "step_ptr", "lr",
             "lr_ptr"]
    values = dict(zip(names, args))
    assert values["exp_avg_ptr"].dtype.is_floating_point and values["meta_ptr"].dtype.itemsize == 8
    assert kwargs["LR_IS_TENSOR"] is True and kwargs["BLOCK"] == BLOCK and str(kwargs["PARAM_DTYPE"]) == "bf16"


def test_access_width_counter():
    ptx = "ld.global.v4.b32 {...}; ld.global.b32 %r1; st.global.v2.b64 [x]; st.global.b16 [y];"
    assert codegen.access_widths(ptx) == {"loads_128": 1, "loads_narrow": 1, "stores_128": 1, "stores_narrow": 1}
