"""`snr-triton codegen`: the Triton kernel's GPU machine code, compiled here, with no GPU.

The interpreter proves the math; this proves what a GPU would run. Every variant is captured
from the real host launch path (backend/triton.py steps a bucket with the kernel replaced by a
recorder), so the signature, the constexprs and the pointer alignments Triton's JIT would
specialize on are those of a real launch. Each is compiled with `triton.compile` for a CUDA
target (ptxas ships in the triton wheel; no driver needed) and measured: registers per
thread, spills, how many global loads and stores are 128 bits wide, SASS instructions per
element.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .contract import TRITON_STATE_DTYPES, GATES, TRITON_DTYPES
from .param_states import BucketStates
from .hyperparams import DEFAULT_HYPER, Hyper

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
               torch.int32: "i32", torch.uint8: "u8"}
OPTIONS = ("maximize", "grad_scaler", "lr_tensor", "stochastic_rounding", "track_stats")


@dataclass(frozen=True)
class Variant:
    param_dtype: str
    state_dtype: str
    gate: str
    maximize: bool = False
    grad_scaler: bool = False  # grad_scale and found_inf, as torch.amp.GradScaler passes them
    lr_tensor: bool = False
    stochastic_rounding: bool = False  # bf16 params only
    track_stats: bool = False

    @property
    def name(self) -> str:
        on = [o for o in OPTIONS if getattr(self, o)]
        return "-".join([self.param_dtype, f"{self.state_dtype}states", self.gate, *on])


SETS = ("paths", "each", "all")


def variants(which: str = "each") -> list[Variant]:
    """Every dtype pair x gate, plain and with every option on ("paths": every code path of the
    kernel), plus each option alone ("each"), or every combination of options ("all", 1,280)."""
    out = []
    for pdt, sdt, gate in itertools.product(TRITON_DTYPES, TRITON_STATE_DTYPES, GATES):
        base = dict(param_dtype=DTYPE_NAMES[pdt], state_dtype=DTYPE_NAMES[sdt], gate=gate)
        usable = [o for o in OPTIONS if o != "stochastic_rounding" or pdt == torch.bfloat16]
        if which == "all":
            for flags in itertools.product([False, True], repeat=len(usable)):
                out.append(Variant(**base, **dict(zip(usable, flags))))
            continue
        out.append(Variant(**base))
        if which == "each":
            out += [Variant(**base, **{o: True}) for o in usable]
        out.append(Variant(**base, **{o: True for o in usable}))
    return out


class _Recorder:
    """Stands in for the kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def capture_launch(variant: Variant) -> tuple[tuple, dict]:
    """The arguments backend/triton.py passes to the kernel for this variant (on CPU tensors)."""
    from .backend import triton as triton_backend

    dtypes = {v: k for k, v in DTYPE_NAMES.items()}
    pdt = dtypes[variant.param_dtype]
    params = [torch.nn.Parameter(torch.zeros(n, dtype=pdt)) for n in (5000, 1024)]
    grads = [torch.zeros_like(p) for p in params]
    hyper = Hyper(**{**asdict(DEFAULT_HYPER), "gate": variant.gate, "maximize": variant.maximize,
                     "state_dtype": dtypes[variant.state_dtype], "track_stats": variant.track_stats,
                     "stochastic_rounding": variant.stochastic_rounding,
                     "lr": torch.tensor(1e-3) if variant.lr_tensor else 1e-3})
    bucket = BucketStates({}, torch.device("cpu"), pdt, hyper.state_dtype)
    slots = [bucket.new_slot(p, seed) for seed, p in enumerate(params)]
    recorder = _Recorder()
    saved = triton_backend._kernel_module
    triton_backend._kernel_module = type("Kernels", (), {"snr_adamw_kernel": recorder})
    try:
        scaler = dict(grad_scale=torch.tensor(1.0), found_inf=torch.tensor(0.0)) if variant.grad_scaler else \
            dict(grad_scale=None, found_inf=None)
        triton_backend.step(bucket, slots, params, grads, hyper, **scaler)
    finally:
        triton_backend._kernel_module = saved
    (_, args, kwargs), = recorder.launches
    return args, kwargs


def _compiled_kernel():
    """The kernel as a JITFunction (the interpreter, if switched on, would hand us another kind)."""
    from .backend import kernel_file

    path = kernel_file("snr_adamw.py")
    previous = os.environ.pop("TRITON_INTERPRET", None)
    try:
        spec = importlib.util.spec_from_file_location("snr_triton_codegen_kernel", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is not None:
            os.environ["TRITON_INTERPRET"] = previous
    return module.snr_adamw_kernel


def signature(fn, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs) as Triton's JIT would specialize this launch: pointers that
    are 16-byte aligned carry tt.divisibility 16."""
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = values[name]
        if i in fn.constexprs:
            sig[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + DTYPE_NAMES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            sig[name] = "fp32"
    return sig, constexprs, attrs


@dataclass
class Report:
    variant: str
    arch: int
    registers: int
    spills: int  # local memory bytes per thread
    stack: int  # call-frame bytes per thread (sqrt slow path kept out of line)
    loads_128: int
    loads_narrow: int
    stores_128: int
    stores_narrow: int
    sass_per_element: float


_GLOBAL = re.compile(r"\b(ld|st)\.global(?:\.[a-z0-9]+)*?(\.v[248])?\.(b|u|s|f)(8|16|32|64)\b")


def access_widths(ptx: str) -> dict[str, int]:
    """Count global loads/stores by width in bits (vector count x element bits)."""
    out = {"loads_128": 0, "loads_narrow": 0, "stores_128": 0, "stores_narrow": 0}
    for op, vec, _, bits in _GLOBAL.findall(ptx):
        width = int(vec[2:] if vec else 1) * int(bits)
        kind = "loads" if op == "ld" else "stores"
        out[f"{kind}_128" if width >= 128 else f"{kind}_narrow"] += 1
    return out


def _cuda_tool(name: str, cubin: bytes, *flags: str) -> str:
    """Run one of the CUDA binary tools that ship inside the triton wheel on a cubin."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), *flags, f.name], capture_output=True, text=True, check=True).stdout


def resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers per thread, local memory bytes (register spills), call-stack bytes) from cuobjdump.
    A stack appears when ptxas keeps a subroutine call (the IEEE sqrt's slow path for denormal and
    special inputs) out of line; it is not register pressure."""
    usage = _cuda_tool("cuobjdump", cubin, "-res-usage")
    return tuple(int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "LOCAL", "STACK"))


def expected_wide_accesses(variant: Variant, block: int, num_warps: int) -> tuple[int, int]:
    """128-bit loads and stores one thread's fast path needs when all five streams (theta, g, m,
    v, s) and four stores (theta, m, v, s) are full width. 8-bit states: theta and g (a thread's
    codes of a state are 8 bytes, and its table lookups single words)."""
    per_thread = block // (32 * num_warps)
    p = 2 if variant.param_dtype in ("bf16", "fp16") else 4
    wide = lambda size: per_thread * size // 16  # noqa: E731
    if variant.state_dtype == "u8":
        return 2 * wide(p), wide(p)
    s = 2 if variant.state_dtype == "bf16" else 4
    return 2 * wide(p) + 3 * wide(s), wide(p) + 3 * wide(s)


def compile_variant(fn, variant: Variant, arch: int, out: Path | None = None) -> Report:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    args, kwargs = capture_launch(variant)
    sig, constexprs, attrs = signature(fn, args, kwargs)
    options = {k: kwargs[k] for k in ("num_warps",) if k in kwargs}
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                            options=options)
    ptx = kernel.asm["ptx"]
    sass = _cuda_tool("nvdisasm", kernel.asm["cubin"], "-c")
    registers, spills, stack = resources(kernel.asm["cubin"])
    instructions = sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/\s+\S", line))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{variant.name}.sm{arch}.ptx").write_text(ptx)
        (out / f"{variant.name}.sm{arch}.sass").write_text(sass)
    return Report(variant.name, arch, registers, spills, stack, **access_widths(ptx),
                  sass_per_element=instructions / kwargs["BLOCK"])


def run(archs: list[int], out: str | None, which: str = "each", progress: bool = True) -> list[Report]:
    """Compile `variants(which)` for each arch. Run it in a process that has not run the kernel
    under Triton's interpreter: the interpreter patches triton.language, and compiling after it
    fails (tests run this command in a subprocess)."""
    fn = _compiled_kernel()
    todo = [(v, a) for v in variants(which) for a in archs]
    if progress:
        from tqdm import tqdm

        todo = tqdm(todo, desc="compiling", unit="variant")
    return [compile_variant(fn, v, a, Path(out) if out else None) for v, a in todo]
