"""What only the CPU backend has: the compiled C kernel, its contract and its on-disk cache.

The cache tests run fresh processes (the library is loaded once per process), each with its
own empty cache directory, and count compiler runs through a CC wrapper that logs each call.
"""

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import CPU_KERNEL
from snr_triton import SNRAdamW, contract
from snr_triton.backend import cpu

pytestmark = pytest.mark.skipif(not CPU_KERNEL, reason="no C compiler on this machine")

LOAD = textwrap.dedent("""
    import torch
    from snr_triton import SNRAdamW
    p = torch.nn.Parameter(torch.ones(64))
    opt = SNRAdamW([p], lr=0.1, weight_decay=0.0, gate="none", backend="cpu")
    p.grad = torch.ones(64)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((64,), 0.9)), p
    print("stepped")
""")


def counting_cc(tmp_path):
    """A C compiler that appends a line to a log on every run, then runs the real one."""
    log = tmp_path / "cc.log"
    script = tmp_path / "cc"
    script.write_text(f"#!/bin/sh\necho run >> {log}\nexec {cpu._compiler()} \"$@\"\n")
    script.chmod(0o755)
    return str(script), log


def run(cache, cc, n=1):
    env = dict(os.environ, SNR_TRITON_CACHE=str(cache), CC=cc)
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    return [(p.wait(timeout=240), *p.communicate()) for p in procs]


def compiles(log):
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_eight_processes_on_an_empty_cache_compile_once(tmp_path):
    cc, log = counting_cc(tmp_path)
    results = run(tmp_path / "cache", cc, n=8)
    assert all(code == 0 and "stepped" in out for code, out, _ in results), results
    assert compiles(log) == 1


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_a_damaged_cached_library_is_rebuilt(tmp_path, damage):
    cc, log = counting_cc(tmp_path)
    cache = tmp_path / "cache"
    assert run(cache, cc)[0][0] == 0 and compiles(log) == 1
    (lib,) = cache.glob("*.so")
    data = lib.read_bytes()
    lib.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:4096] + b"\0" * 64 + data[4160:])
    code, out, err = run(cache, cc)[0]
    assert code == 0 and "stepped" in out, err
    assert compiles(log) == 2  # detected by its checksum and rebuilt, never loaded damaged
    assert lib.read_bytes() != data[: len(data) // 2]


def test_an_unwritable_cache_falls_back_to_a_private_directory(tmp_path):
    cc, log = counting_cc(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, out, err = run(blocker / "cache", cc)[0]
    assert code == 0 and "stepped" in out, err
    assert "not writable" in err and compiles(log) == 1


def test_the_compiled_library_reports_the_contract():
    lib = cpu.load_library()
    import ctypes

    values = (ctypes.c_int64 * 64)()
    n = lib.snr_adamw_contract(values)
    assert dict(zip(cpu._CONTRACT_ORDER, list(values)[:n])) == contract.c_defines()


def test_the_c_source_has_no_contract_of_its_own():
    """Gate ids, table columns and stats columns come from contract.py as -D defines only."""
    source = cpu._source().read_text()
    for name in contract.c_defines():
        assert f"#define {name}" not in source and f"{name} =" not in source, name


def test_the_threaded_path_with_8bit_states_steps_every_chunk_and_block():
    """8-bit states on 2 threads: every chunk stepped and every block's scale written (a scale
    pointer off by a chunk would leave blocks at 0), one step against the float64 reference."""
    from snr_triton import reference
    from snr_triton.hyperparams import DEFAULTS

    sizes = (cpu.PARALLEL_MIN + cpu.CHUNK + 100, 2 * cpu.CHUNK + 5)
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    hp = dict(DEFAULTS, lr=1e-2, alpha=0.7)
    opt = SNRAdamW(params, backend="cpu", state_dtype=torch.uint8, **hp)
    refs = [p.detach().clone() for p in params]
    states = [reference.new_state(p) for p in params]
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    finally:
        torch.set_num_threads(previous)
    for p, r, g, st in zip(params, refs, grads, states):
        before = r.clone()
        reference.reference_step(r, g, st, **hp, state_dtype=torch.uint8)
        assert (p.detach() != before).all()
        torch.testing.assert_close(p.detach(), r, rtol=2.0**-22, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq", "exp_grad_var"):
            scales = opt.state[p][key + "_scales"]
            assert (scales > 0).all()
            torch.testing.assert_close(scales, st[key + "_scales"], rtol=2.0**-22, atol=0)
            assert (opt.state[p][key + "_codes"] != st[key + "_codes"]).sum() <= p.numel() * 1e-3


def test_cpu_kernel_refuses_what_it_cannot_do():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="backend='cpu'.*float32 and bfloat16.*backend='eager' or 'auto'"):
        SNRAdamW([p], backend="cpu")
    q = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="stochastic rounding"):
        SNRAdamW([q], backend="cpu", stochastic_rounding=True)


@pytest.mark.parametrize("threads", [2, 3])
def test_the_threaded_path_steps_every_chunk(threads):
    """Buckets of at least PARALLEL_MIN elements are split over threads. Issue 24: every test used a
    few thousand elements, so a wrong split (`nchunks / threads * i`: with 2 threads and 9 chunks
    the last chunk never moves) passed. PARALLEL_MIN + CHUNK elements (2^19 + 2^15: 17 chunks); a
    second tensor makes chunks of two tensors; against the float64 reference."""
    from snr_triton import reference
    from snr_triton.hyperparams import DEFAULTS

    sizes = (cpu.PARALLEL_MIN + cpu.CHUNK, 3 * cpu.CHUNK + 5)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(n, generator=gen) for n in sizes]
    grads = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(3)]
    hp = dict(DEFAULTS, lr=1e-2, alpha=0.7)
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = SNRAdamW(params, backend="cpu", **{k: v for k, v in hp.items()})
    refs, states = [t.double() for t in init], [reference.new_state(t) for t in init]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
            for r, g, st in zip(refs, gs, states):
                reference.reference_step(r, g, st, **hp)
    finally:
        torch.set_num_threads(previous)
    for p, r, p0 in zip(params, refs, init):
        moved = [(c != c0).double().mean() for c, c0 in zip(p.detach().split(cpu.CHUNK), p0.split(cpu.CHUNK))]
        assert min(moved) > 0.99  # no chunk left out (an element the float32 update moves by less
        # than half an ulp may stay: 1 of 98,309 here)
        torch.testing.assert_close(p.detach().double(), r, rtol=0, atol=1e-6)


def test_a_cpu_with_other_flags_or_model_gets_another_library_name(monkeypatch):
    """-march=native code runs only on CPUs like the one that built it: a cache shared between
    machines (an NFS home) keys the library by the CPU's model name and flags, so a machine with
    AVX-512 and one without never load each other's, while two machines alike share one."""
    import builtins
    import io

    real_open = builtins.open
    cpuinfo = {}

    def fake_open(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            return io.BytesIO(cpuinfo["text"])
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)

    def name(model, flags):
        cpuinfo["text"] = (f"processor\t: 0\nmodel name\t: {model}\nflags\t\t: {flags}\n"
                           f"processor\t: 1\nmodel name\t: {model}\nflags\t\t: {flags}\n").encode()
        return cpu.library_name()

    base = name("AMD EPYC 7B13", "fpu sse2 avx2")
    assert name("AMD EPYC 7B13", "fpu sse2 avx2") == base
    assert name("AMD EPYC 7B13", "fpu sse2 avx2 avx512f") != base
    assert name("Intel Xeon Platinum 8481C", "fpu sse2 avx2") != base
    # another compiler's code is another library (CC names the one that built it)
    monkeypatch.setenv("CC", "/opt/clang/bin/clang")
    assert name("AMD EPYC 7B13", "fpu sse2 avx2") != base


def test_without_proc_cpuinfo_the_library_name_is_keyed_by_the_platform(monkeypatch):
    """macOS and the BSDs have no /proc/cpuinfo: the name falls back to platform.machine() and
    platform.processor(), still one name per kind of CPU."""
    import builtins
    import platform

    real_open = builtins.open

    def no_cpuinfo(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    base = cpu.library_name()
    assert cpu.library_name() == base
    monkeypatch.setattr(platform, "processor", lambda: "i386")
    assert cpu.library_name() != base


@pytest.mark.parametrize("found,expected", [
    (("cc", "gcc", "clang"), "/usr/bin/cc"),
    (("gcc", "clang"), "/usr/bin/gcc"),
    (("clang",), "/usr/bin/clang"),
    ((), None),
])
def test_the_compiler_is_cc_then_gcc_then_clang_unless_cc_is_set(monkeypatch, found, expected):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name in found else None)
    monkeypatch.delenv("CC", raising=False)
    assert cpu._compiler() == expected
    monkeypatch.setenv("CC", "/opt/cross/bin/gcc")
    assert cpu._compiler() == "/opt/cross/bin/gcc"


def test_each_reason_the_cpu_backend_declines_names_the_way_out():
    """What backend='cpu' cannot serve is refused with a reason that says which backend can (the
    optimizer puts it after "backend='cpu' cannot step ...")."""
    import dataclasses

    from snr_triton.hyperparams import DEFAULT_HYPER

    f32 = torch.float32
    assert cpu.unavailable_reason(torch.device("cuda", 0), f32, DEFAULT_HYPER) == \
        "it steps CPU tensors only; use backend='triton' or 'auto' on GPUs"
    assert cpu.unavailable_reason(torch.device("cpu"), torch.float16, DEFAULT_HYPER) == \
        "it supports float32 and bfloat16 params; use backend='eager' or 'auto' for torch.float16"
    assert cpu.unavailable_reason(torch.device("cpu"), f32, dataclasses.replace(DEFAULT_HYPER, stochastic_rounding=True)) \
        == "it has no stochastic rounding; use backend='eager' or 'auto'"
    assert cpu.unavailable_reason(torch.device("cpu"), f32, dataclasses.replace(DEFAULT_HYPER, state_dtype=torch.float16)) \
        == "it stores no torch.float16 states; use backend='eager' or 'auto'"
    assert cpu.unavailable_reason(torch.device("cpu"), f32, DEFAULT_HYPER) is None


NO_KERNEL = textwrap.dedent("""
    import torch
    from snr_triton import SNRAdamW
    p = torch.nn.Parameter(torch.ones(4))
    try:
        SNRAdamW([p], backend="cpu")
    except RuntimeError as e:
        print("REFUSED:", e)
    opt = SNRAdamW([p], backend="auto", lr=0.1, weight_decay=0.0, gate="none")
    p.grad = torch.ones(4)
    opt.step()
    print("STEPPED:", opt.backend_of(p), p.detach().tolist())
""")


@pytest.mark.parametrize("compiler", ["failing", "missing"])
def test_without_a_working_c_compiler_cpu_is_refused_with_the_reason_and_auto_steps_eager(tmp_path, compiler):
    """A compiler that fails (its stderr quoted) or none on PATH: backend='cpu' names why, and
    'auto' steps with the eager backend instead (AdamW's first step: 1 - 0.1)."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    env = dict(os.environ, SNR_TRITON_CACHE=str(cache))
    if compiler == "failing":
        cc = tmp_path / "cc"
        cc.write_text("#!/bin/sh\necho 'error: no room for kernels' >&2\nexit 1\n")
        cc.chmod(0o755)
        env["CC"], reason = str(cc), f"{cc} failed: error: no room for kernels"
    else:
        env.pop("CC", None)
        env["PATH"], reason = str(tmp_path / "nowhere"), "no C compiler found (set CC, or install gcc)"
    done = subprocess.run([sys.executable, "-c", NO_KERNEL], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (f"REFUSED: backend='cpu' cannot step a torch.float32 param on cpu: the fused CPU kernel is unavailable: "
            f"{reason} (param group 0)") in done.stdout
    stepped = done.stdout.split("STEPPED: ")[1].split()
    assert stepped[0] == "eager"
    assert [float(x.strip("[],")) for x in stepped[1:]] == pytest.approx([0.9] * 4, rel=1e-6)


@pytest.fixture
def first_load(tmp_path, monkeypatch):
    """This process as if it had not loaded the library yet, with an empty cache of its own: every
    other test uses the library the session's first test loaded, so load_library's first call (the
    compile, the contract check, each function's argument and return types) ran unchecked."""
    monkeypatch.setenv("SNR_TRITON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu, "_library", None)
    monkeypatch.setattr(cpu, "_library_error", None)
    return tmp_path / "cache"


def test_a_first_load_compiles_once_and_steps_with_clipping_like_the_reference(first_load):
    """The library compiled into an empty cache, loaded once per process, then a clipping step of
    a float32 and a bfloat16 param (both C entry points, every argument) against the float64
    reference, stepped on grads scaled by clip_grad_norm_'s coefficient c / (N + 1e-6), N from
    torch.nn.utils.get_total_norm."""
    from snr_triton import reference
    from snr_triton.hyperparams import DEFAULTS

    lib = cpu.load_library()
    assert cpu.load_library() is lib
    assert [p.name for p in first_load.rglob("*.so")] == [cpu.library_name()]
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(300, generator=gen), torch.randn(7, 5, generator=gen).bfloat16()]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    hp = dict(DEFAULTS, lr=1e-2, alpha=0.7, weight_decay=0.1)
    opt = SNRAdamW(params, backend="cpu", max_grad_norm=0.5, **hp)
    refs, states = [t.clone() for t in init], [reference.new_state(t) for t in init]
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in init]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        norm = torch.nn.utils.get_total_norm([g.double() for g in grads])
        torch.testing.assert_close(opt.last_grad_norm().double(), norm, rtol=1e-6, atol=0)
        assert norm > 0.5  # clipping active: k = c / (N + 1e-6), as clip_grad_norm_ computes it
        clipped = [g.double() * (0.5 / (float(norm) + 1e-6)) for g in grads]
        for r, g, st in zip(refs, clipped, states):
            reference.reference_step(r, g, st, **hp)
    for p, r, p0 in zip(params, refs, init):
        assert (p.detach() != p0).any()
        tol = 2e-6 if p.dtype == torch.float32 else 2.0**-7
        torch.testing.assert_close(p.detach().double(), r.double(), rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("compiler", ["failing", "none"])
def test_a_failed_first_load_says_why_and_is_not_retried(first_load, tmp_path, monkeypatch, compiler):
    """A compiler that fails: RuntimeError quoting the last 2000 characters of its stderr (where its
    errors are, after pages of warnings); no compiler: what to install. The reason is kept, so the
    next call (each new optimizer, each step) raises it again without running the compiler."""
    log = tmp_path / "cc.log"
    if compiler == "failing":
        cc = tmp_path / "cc"
        noise = "warning: " + "w" * 2500
        cc.write_text(f"#!/bin/sh\necho run >> {log}\necho '{noise}' >&2\necho 'error: no room for kernels' >&2\n"
                      "exit 3\n")
        cc.chmod(0o755)
        monkeypatch.setenv("CC", str(cc))
        tail = f"{noise}\nerror: no room for kernels"[-2000:]  # the last 2000 characters: the error, not the noise
        why = f"{cc} failed: {tail}"
    else:
        import shutil

        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setattr(shutil, "which", lambda name: None)
        why = "no C compiler found (set CC, or install gcc)"
    for _ in range(2):
        with pytest.raises(RuntimeError) as info:
            cpu.load_library()
        assert str(info.value) == f"the fused CPU kernel is unavailable: {why}"
    if compiler == "failing":
        assert log.read_text() == "run\n"  # compiled once, not again
    assert not list(first_load.rglob("*.so"))
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(RuntimeError) as info:
        SNRAdamW([p], backend="cpu")
    assert str(info.value) == f"backend='cpu' cannot step a torch.float32 param on cpu: the fused CPU kernel is " \
        f"unavailable: {why} (param group 0)"


@pytest.mark.parametrize("stale", ["a value", "a count"])
def test_a_library_that_disagrees_with_the_contract_is_refused(first_load, monkeypatch, stale):
    """A library built from another version's defines (a stale cache entry keyed wrongly, a
    hand-built .so) would read the block map's columns or the gate ids differently: its
    snr_adamw_contract() report is checked against contract.py before any step."""
    from snr_triton.backend import kernel_cache

    order = cpu._CONTRACT_ORDER

    def report(values):
        defines = contract.c_defines()
        for i, name in enumerate(order):
            values[i] = defines[name] + (i == 5 and stale == "a value")
        return len(order) - (stale == "a count")

    class Library:
        snr_adamw_contract = staticmethod(report)

    monkeypatch.setattr(kernel_cache, "load", lambda name, build: Library())
    with pytest.raises(RuntimeError) as info:
        cpu.load_library()
    assert str(info.value) == ("the fused CPU kernel is unavailable: "
                               "the compiled library disagrees with snr_triton/contract.py")


_registered = itertools.count()


@pytest.fixture
def registered_anew(monkeypatch):
    """The CPU backend's step and norm pass registered anew by fused_op.register and register_norm:
    the ops every other test calls were registered when the backend was imported, before any test
    ran, so a change to what register builds (under bench/mutmut.sh, say) reached no test."""
    from snr_triton import fused_op

    name = f"{os.getpid()}_{next(_registered)}"  # an op's name is taken once per process
    op, impl = fused_op.register(f"cpu_step_anew_{name}", cpu.launch, cpu.CHUNK)
    norm_op, norm = fused_op.register_norm(f"cpu_grad_sq_anew_{name}", cpu._launch_sq, cpu.CHUNK)
    for attr, value in (("fused_step_op", op), ("fused_step", impl), ("grad_sq_op", norm_op), ("grad_sq", norm)):
        monkeypatch.setattr(cpu, attr, value)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.uint8])
def test_an_op_registered_anew_passes_every_argument_to_the_kernel(registered_anew, state_dtype):
    """Every argument of the step reaches the kernel by name: two groups (gate, tensor or float lr,
    weight decay, alpha, maximize, warm-up), a param that is not dense (stepped through a stand-in
    and written back), a bfloat16 param, clipping, GradScaler's grad_scale and found_inf (an inf skips
    the step: nothing changes), the stats, float32 or 8-bit states; against the float64 reference."""
    from snr_triton import reference
    from snr_triton.hyperparams import DEFAULTS

    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(300, generator=gen), torch.randn(6, 8, generator=gen)[:, ::2],
            torch.randn(40, generator=gen).bfloat16()]
    params = [torch.nn.Parameter(init[0].clone()),
              torch.nn.Parameter(torch.empty(6, 8)[:, ::2].copy_(init[1])),  # every other column: not dense
              torch.nn.Parameter(init[2].clone())]
    assert not params[1].is_contiguous() and params[1].stride() == (8, 2)
    hps = [dict(DEFAULTS, lr=1e-2, alpha=0.7, weight_decay=0.1),
           dict(DEFAULTS, lr=5e-3, gate="soft", alpha=0.4, softness=0.5, maximize=True, warmup_steps=1)]
    opt = SNRAdamW([{"params": params[:2], **hps[0], "lr": torch.tensor(1e-2)}, {"params": params[2:], **hps[1]}],
                   backend="cpu", state_dtype=state_dtype, max_grad_norm=0.5, track_stats=True)
    refs, states = [t.clone() for t in init], [reference.new_state(t) for t in init]
    scale = torch.tensor(4.0)
    for k in range(3):
        grads = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in init]
        for p, g in zip(params, grads):
            p.grad = g * scale
        before = [p.detach().clone() for p in params] + [opt.state[p]["step"].clone() for p in params if opt.state[p]]
        opt.step(grad_scale=scale, found_inf=torch.tensor(float(k == 1)))
        if k == 1:  # the inf step: params and step counts as they were
            after = [p.detach() for p in params] + [opt.state[p]["step"] for p in params]
            assert all(torch.equal(a, b) for a, b in zip(before, after))
            continue
        norm = float(torch.nn.utils.get_total_norm([g.double() for g in grads]))
        assert norm > 0.5
        parts = []
        for i, (r, g, st) in enumerate(zip(refs, grads, states)):
            hp = hps[0] if i < 2 else hps[1]
            out = reference.reference_step(r, g.double() * (0.5 / (norm + 1e-6)), st, **hp, state_dtype=state_dtype)
            parts.append(out["q"].flatten())
        mean_gate = torch.cat(parts).mean().item()
        assert opt.stats()["mean_gate"] == pytest.approx(mean_gate, rel=1e-5)
    for p, r, p0 in zip(params, refs, init):
        assert (p.detach() != p0).any()
        tol = 2e-6 if p.dtype == torch.float32 else 2.0**-7
        torch.testing.assert_close(p.detach().double(), r.double(), rtol=tol, atol=tol * 1e-2)
        assert int(opt.state[p]["step"]) == 2


def _is_gcc() -> bool:
    """The compiler is gcc (clang defines __GNUC__ too, and has no -fopt-info)."""
    cc = cpu._compiler()
    if cc is None:
        return False
    try:
        proc = subprocess.run([cc, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True)
    except OSError:
        return False
    return proc.returncode == 0 and "__GNUC__" in proc.stdout and "__clang__" not in proc.stdout


@pytest.mark.skipif(os.uname().machine != "x86_64" or not _is_gcc(), reason="reads gcc's vectorizer report for x86-64")
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64-v4"])
def test_every_variant_of_the_step_loop_is_vectorized_with_avx2_and_with_avx512(arch, tmp_path):
    """The step is memory-bound only while its loop is vectorized: a multiply under a condition
    (rho = 0's select) once left 62 of the loop's 64 variants scalar on AVX2 CPUs, 5-10x slower,
    while AVX-512 machines, which if-convert it with masks, showed nothing. gcc's report of each
    DEFINE_CHUNK line (its macro body's loops are reported there) must hold no loop it could not
    vectorize, for both instruction sets, whichever this machine has."""
    flags = [f for f in cpu._flags() if not f.startswith("-march=") and f != "-shared"]
    proc = subprocess.run([cpu._compiler(), *flags, f"-march={arch}", "-c", str(cpu._source()),
                           "-o", str(tmp_path / "k.o"), "-fopt-info-vec-all"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [i + 1 for i, text in enumerate(cpu._source().read_text().splitlines()) if text.startswith("DEFINE_CHUNK(")]
    assert len(lines) == 4  # fp32/bf16 params x fp32/bf16 states
    for line in lines:
        report = [r for r in proc.stderr.splitlines() if f"snr_adamw_cpu.c:{line}:" in r]
        vectorized = [r for r in report if "loop vectorized" in r]
        missed = [r for r in report if "couldn't vectorize loop" in r or "not vectorized:" in r]
        assert not missed, f"line {line} ({arch}): {missed[:3]}"
        assert len(vectorized) >= 16, f"line {line} ({arch}): {len(vectorized)} vectorized loops for 16 variants"
