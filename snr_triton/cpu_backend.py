"""The fused CPU step: kernels/snr_adamw_cpu.c, compiled once with the system C compiler.

Eager torch ops write a temporary per intermediate and run ~30x slower than fused AdamW
on a CPU. This is the single-pass twin of the Triton kernel. The shared library is cached
under ~/.cache/snr-triton (or $SNR_TRITON_CACHE), keyed by the source, flags and compiler,
so only the first process on a machine pays the ~1 s compile.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .flat_state import FlatState, kernel_operands

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
CHUNK = 1 << 15  # elements per work item: large enough to amortize, small enough to balance threads
PARALLEL_MIN = 1 << 18  # below this many elements a step runs on the calling thread alone
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-pthread", "-fPIC", "-shared", "-fno-math-errno",
          "-std=c11"]
GATE_IDS = {"none": 0, "snr": 1, "soft": 2, "hard": 3}

_library: ctypes.CDLL | None = None
_library_error: str | None = None


class _Hyper(ctypes.Structure):
    _fields_ = [(name, ctypes.c_double) for name in (
        "beta1", "beta2", "rho", "eps", "weight_decay", "alpha", "softness", "gate_eps", "lr",
        "inv_grad_scale")] + [("warmup_steps", ctypes.c_int64)]


def _source() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels" / "snr_adamw_cpu.c", here.parent / "kernels" / "snr_adamw_cpu.c"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError("kernels/snr_adamw_cpu.c is missing: reinstall snr-triton")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def cache_dir() -> Path:
    root = os.environ.get("SNR_TRITON_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "snr-triton")
    return Path(root)


def _cpu_signature() -> bytes:
    """-march=native code runs only on CPUs like this one: a cache shared between machines (an NFS
    home) must not hand one machine's library to another."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return b"".join(sorted({line for line in f if line.startswith((b"model name", b"flags"))}))
    except OSError:
        import platform

        return (platform.machine() + platform.processor()).encode()


def library_path() -> Path:
    source = _source().read_bytes()
    tag = hashlib.sha256(source + " ".join(_FLAGS).encode() + str(_compiler()).encode()
                         + _cpu_signature()).hexdigest()[:16]
    return cache_dir() / f"snr_adamw_cpu-{tag}.so"


def load_library() -> ctypes.CDLL:
    """Compile (first time on this machine) and load the CPU kernel; raises RuntimeError with the
    reason when there is no working C compiler."""
    global _library, _library_error
    if _library is not None:
        return _library
    if _library_error is not None:
        raise RuntimeError(_library_error)
    try:
        path = library_path()
        if not path.exists():
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (set CC, or install gcc)")
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                out = Path(tmp) / path.name
                proc = subprocess.run([cc, *_FLAGS, str(_source()), "-o", str(out), "-lm"],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
                os.replace(out, path)  # atomic: concurrent processes never load a partial file
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as e:
        _library_error = f"the fused CPU kernel is unavailable: {e}"
        raise RuntimeError(_library_error) from e
    fn = lib.snr_adamw_step
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(_Hyper), ctypes.c_int,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    _library = lib
    return lib


def cpu_unavailable_reason() -> str | None:
    try:
        load_library()
    except RuntimeError as e:
        return str(e)
    return None


class _Tables:
    def __init__(self, key: tuple, params: list[Tensor], grads: list[Tensor], offsets: list[int],
                 slots: list[int], num_slots: int):
        rows, chunks = [], []
        for j, (p, g, off, slot) in enumerate(zip(params, grads, offsets, slots)):
            rows.append([p.data_ptr(), g.data_ptr(), off, slot])
            n = p.numel()
            chunks.extend([j, start, min(CHUNK, n - start)] for start in range(0, n, CHUNK))
        self.key = key
        self.numel = sum(p.numel() for p in params)
        self.rows = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
        self.chunks = torch.tensor(chunks, dtype=torch.int64).reshape(-1, 3)
        self.stats = torch.zeros(len(chunks), 4, dtype=torch.float64)
        self.all_active = list(slots) == list(range(num_slots))
        self.slots = torch.tensor(slots, dtype=torch.int64)


def cpu_step(flat: FlatState, params: list[Tensor], grads: list[Tensor], group: dict[str, Any], *,
             grad_scale: Tensor | None, found_inf: Tensor | None, track_stats: bool) -> Tensor | None:
    """Step the active `params` of a CPU bucket in one pass; returns the gate sums with track_stats."""
    lib = load_library()
    if found_inf is not None and found_inf.item() != 0:  # a CPU tensor: no device to wait for
        return torch.zeros(4, dtype=torch.float64) if track_stats else None
    slots = [flat.index[p] for p in params]
    real_p, real_g, write_back, key = kernel_operands(params, grads, slots)
    tables = getattr(flat, "_cpu_tables", None)
    if tables is None or tables.key != key:
        tables = flat._cpu_tables = _Tables(key, real_p, real_g, [flat.offsets[i] for i in slots], slots,
                                            len(flat.params))

    if tables.all_active:
        flat.steps.add_(1)
    else:
        flat.steps.index_add_(0, tables.slots, torch.ones(len(slots)))
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    hyper = _Hyper(beta1, beta2, group["rho"], group["eps"], group["weight_decay"], group["alpha"],
                   group["softness"], group["gate_eps"], float(lr.item() if isinstance(lr, Tensor) else lr),
                   1.0 / grad_scale.item() if grad_scale is not None else 1.0, int(group["warmup_steps"]))
    bufs = flat.buffers
    lib.snr_adamw_step(
        tables.rows.data_ptr(), tables.chunks.data_ptr(), tables.chunks.shape[0],
        bufs["exp_avg"].data_ptr(), bufs["exp_avg_sq"].data_ptr(), bufs["exp_grad_var"].data_ptr(),
        flat.steps.data_ptr(), ctypes.byref(hyper), GATE_IDS[group["gate"]], int(group["maximize"]),
        int(flat.dtype == torch.bfloat16), int(bufs["exp_avg"].dtype == torch.bfloat16),
        tables.stats.data_ptr() if track_stats else None,
        torch.get_num_threads() if tables.numel >= PARALLEL_MIN else 1)
    for dst, src in write_back:
        dst.copy_(src)
    return tables.stats.sum(0) if track_stats else None
