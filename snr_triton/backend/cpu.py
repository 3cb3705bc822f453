"""The CPU backend: kernels/snr_adamw_cpu.c, the single-pass twin of the Triton kernel.

Eager torch ops write a temporary per intermediate and run ~20x slower than fused AdamW on a
CPU. The C source is compiled once per machine with the system C compiler and cached under
~/.cache/snr-triton (or $SNR_TRITON_CACHE), keyed by the source, flags, compiler and CPU; the
cache trusts only what this user alone could have written (kernel_cache.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch
from torch import Tensor

from .. import clipping, codebook, fused_op
from ..contract import CPU_DTYPES, CPU_STATE_DTYPES, GATE_IDS, c_defines
from ..hyperparams import Hyper
from ..param_states import BucketStates, Slot
from . import Degraded, kernel_cache, kernel_file

CHUNK = 1 << 15  # elements per work item: large enough to amortize, small enough to balance threads
# Below these many elements a pass runs on the calling thread alone: a second thread paid for its
# start from about 16 MB moved (2 cores of an AMD EPYC, 2026-12-04: a step moves 36 B per fp32
# element, the norm pass reads 4).
PARALLEL_MIN = 1 << 19
NORM_PARALLEL_MIN = 1 << 22
AUTO_DEVICE_TYPES = ("cpu",)
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd", "-pthread", "-fPIC", "-shared", "-fno-math-errno",
          "-std=c11"]
# The order in which snr_adamw_contract() reports the defines it was compiled with.
_CONTRACT_ORDER = ("GATE_NONE", "GATE_SNR", "GATE_SOFT", "GATE_HARD", "ROW_PARAM_ADDR", "ROW_GRAD_ADDR",
                   "ROW_EXP_AVG_ADDR", "ROW_EXP_AVG_SQ_ADDR", "ROW_EXP_GRAD_VAR_ADDR", "ROW_NUMEL",
                   "ROW_FIRST_BLOCK", "ROW_STEP_SLOT", "ROW_RNG_SEED", "ROW_ALIGNED", "STAT_SUM_Q",
                   "STAT_COUNT_ABOVE", "STAT_SUM_SIGNAL", "STAT_SUM_NOISE", "ROW_COLUMNS", "STAT_COLUMNS",
                   "ROW_EXP_AVG_SCALES_ADDR", "ROW_EXP_AVG_SQ_SCALES_ADDR", "ROW_EXP_GRAD_VAR_SCALES_ADDR",
                   "CODE_BLOCK", "LUT_EXP_MIN", "LUT_MANTISSA_BITS", "LUT_HALF")
STATE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.uint8: 2}  # the C kernel's STATE_F32, _BF16, _U8

_library: ctypes.CDLL | None = None
_library_error: str | None = None


class _Hyper(ctypes.Structure):
    _fields_ = [(name, ctypes.c_double) for name in (
        "beta1", "beta2", "rho", "eps", "weight_decay", "alpha", "softness", "gate_eps", "lr",
        "inv_grad_scale")] + [("warmup_steps", ctypes.c_int64)]


def unavailable_reason(device: torch.device, dtype: torch.dtype, hyper: Hyper) -> str | None:
    if device.type != "cpu":
        return "it steps CPU tensors only; use backend='triton' or 'auto' on GPUs"
    if dtype not in CPU_DTYPES:
        return f"it supports float32 and bfloat16 params; use backend='eager' or 'auto' for {dtype}"
    if hyper.stochastic_rounding:
        return "it has no stochastic rounding; use backend='eager' or 'auto'"
    if hyper.state_dtype not in CPU_STATE_DTYPES:
        return f"it stores no {hyper.state_dtype} states; use backend='eager' or 'auto'"
    try:
        load_library()
    except RuntimeError as e:
        return Degraded(str(e))
    return None


def _source() -> Path:
    return kernel_file("snr_adamw_cpu.c")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _flags() -> list[str]:
    return _FLAGS + [f"-D{k}={v}" for k, v in c_defines().items()]


def cache_dir() -> Path:
    return kernel_cache.default_dir()


def _cpu_signature() -> bytes:
    """-march=native code runs only on CPUs like this one: a cache shared between machines (an NFS
    home) must not hand one machine's library to another."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return b"".join(sorted({line for line in f if line.startswith((b"model name", b"flags"))}))
    except OSError:
        import platform

        return (platform.machine() + platform.processor()).encode()


def library_name() -> str:
    source = _source().read_bytes()
    tag = hashlib.sha256(source + " ".join(_flags()).encode() + str(_compiler()).encode()
                         + _cpu_signature()).hexdigest()[:16]
    return f"snr_adamw_cpu-{tag}.so"


def _build(out: Path) -> None:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    proc = subprocess.run([cc, *_flags(), str(_source()), "-o", str(out), "-lm"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")


def load_library() -> ctypes.CDLL:
    """Compile (first time on this machine) and load the CPU kernel; raises RuntimeError with the
    reason when it cannot."""
    global _library, _library_error
    if _library is not None:
        return _library
    if _library_error is not None:
        raise RuntimeError(_library_error)
    try:
        lib = kernel_cache.load(library_name(), _build)
        lib.snr_adamw_contract.restype = ctypes.c_int64
        values = (ctypes.c_int64 * len(_CONTRACT_ORDER))()
        if lib.snr_adamw_contract(values) != len(_CONTRACT_ORDER) or \
                list(values) != [c_defines()[k] for k in _CONTRACT_ORDER]:
            raise RuntimeError("the compiled library disagrees with snr_triton/contract.py")
    except (OSError, RuntimeError) as e:
        _library_error = f"the fused CPU kernel is unavailable: {e}"
        raise RuntimeError(_library_error) from e
    fn = lib.snr_adamw_step
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.POINTER(_Hyper), ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_void_p]
    sq = lib.snr_grad_sq
    sq.restype = ctypes.c_int
    sq.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                   ctypes.c_int]
    _library = lib
    return lib


def launch(job: fused_op.Launch) -> None:
    """One pass of the C kernel over the job's block map (found_inf and a tensor lr are CPU
    tensors here: reading them waits for nothing)."""
    lib = load_library()
    table, steps = job.table, job.steps
    if job.found_inf is not None and job.found_inf.item() != 0:
        job.stats.zero_()
        return
    table.count_step(steps)
    partials = table.partial_sums(torch.float64) if job.track_stats else None
    c_hyper = _Hyper(job.beta1, job.beta2, job.rho, job.eps, job.weight_decay, job.alpha, job.softness, job.gate_eps,
                     job.lr_tensor.item() if job.lr_tensor is not None else job.lr,
                     1.0 / job.grad_scale.item() if job.grad_scale is not None else 1.0, job.warmup_steps)
    kind = STATE_KINDS[job.bucket.state_dtype]
    done = lib.snr_adamw_step(
        table.rows.data_ptr(), table.block_tensor.data_ptr(), table.num_blocks, CHUNK, steps.data_ptr(),
        ctypes.byref(c_hyper), GATE_IDS[job.gate], int(job.maximize), int(job.bucket.dtype == torch.bfloat16),
        kind, partials.data_ptr() if partials is not None else None,
        torch.get_num_threads() if table.numel >= PARALLEL_MIN else 1,
        codebook.kernel_buffer().data_ptr() if kind == STATE_KINDS[torch.uint8] else None)
    if done != 0:
        raise RuntimeError(f"the C kernel refused its arguments (8-bit states need a chunk of whole {codebook.BLOCK}-"
                           "element blocks and the code tables)")
    if job.track_stats:  # per-chunk partial sums, added per tensor
        job.stats.zero_().index_add_(0, table.block_tensor, partials)


fused_step_op, fused_step = fused_op.register("cpu_step", launch, CHUNK)


def step(bucket: BucketStates, slots: list[Slot], params: list[Tensor], grads: list[Tensor], hyper: Hyper, *,
         grad_scale: Tensor | None, found_inf: Tensor | None) -> Tensor | None:
    return fused_op.call(fused_step_op, fused_step, bucket, slots, params, grads, hyper, grad_scale, found_inf,
                         torch.float64)


def _launch_sq(bucket: BucketStates, table) -> Tensor:
    partials = torch.empty(table.num_blocks, dtype=torch.float64)
    load_library().snr_grad_sq(table.rows.data_ptr(), table.block_tensor.data_ptr(), table.num_blocks, CHUNK,
                               int(bucket.dtype == torch.bfloat16), partials.data_ptr(),
                               torch.get_num_threads() if table.numel >= NORM_PARALLEL_MIN else 1)
    return partials.sum()


grad_sq_op, grad_sq = fused_op.register_norm("cpu_grad_sq", _launch_sq, CHUNK)


def grad_sq_sum(bucket: BucketStates, slots: list[Slot], params: list[Tensor], grads: list[Tensor]) -> Tensor:
    """Sum of g^2 over the active grads (float64): one read of each grad, by the C kernel."""
    return fused_op.call_norm(grad_sq_op, grad_sq, bucket, slots, params, grads)


clip_op, clip = clipping.register("cpu_clip_coefficients", clipping.host)


def clip_coefficients(total: Tensor, grad_scale: Tensor | None, found_inf: Tensor | None, skipped: Tensor | None,
                      max_norm: float) -> clipping.Coefficients:
    """max_grad_norm's coefficient on the host (snr_triton/clipping.py)."""
    return clipping.call(clip_op, clip, total, grad_scale, found_inf, skipped, max_norm)
