"""`snr-triton bench`: step time, achieved bandwidth and memory, side by side with torch AdamW.

All implementations of one size run interleaved in the same process (round robin), and the
table reports medians and ratios to fused AdamW measured in that same run: absolute times on
a shared machine are noisy, ratios much less so. Bytes per step follow ALGORITHM.md's byte
model (read theta, g, m, v, s; write theta, m, v, s), so GB/s compares like with like.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from . import codebook
from .optimizer import SNRAdamW

CPU_SIZES = (1 << 20, 16 << 20, 64 << 20)
GPU_SIZES = (1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30)
EAGER_MAX = 64 << 20  # the eager path's temporaries and time make larger cells pointless


def format_size(numel: int) -> str:
    """256K, 16M, 1G: binary prefixes, as the sizes are chosen."""
    for shift, unit in ((30, "G"), (20, "M"), (10, "K")):
        if numel >= 1 << shift:
            value = numel / (1 << shift)
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return str(numel)


def parse_size(text: str) -> int:
    """'256K', '16M', '1G', or a plain number of params (argparse type: bad input exits 2)."""
    import argparse

    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 256K, 16M, 1G or 1048576)") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"a size must be a whole number of params >= 1, got {text!r}")
    return int(value)


def cache_bytes(device: torch.device) -> int:
    """The last-level cache: a working set below it is measured from cache, not memory."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    try:
        sizes = []
        for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            text = (index / "size").read_text().strip()
            sizes.append(int(text[:-1]) * 1024 if text.endswith("K") else int(text))
        return max(sizes)
    except (OSError, ValueError):
        return 0


@dataclass
class Row:
    device: str
    numel: int
    dtype: str
    impl: str
    ms: float
    bytes_per_step: int
    gbps: float
    ratio: float
    copy_gbps: float  # a copy moving as many bytes as SNRAdamW's fp32 step, measured in the same run
    roofline_pct: float
    in_cache: bool  # the optimizer's working set fits the last-level cache
    sync_ms: float  # GPU: one step waited for (host work included); CPU: ms again


def _bytes(impl: str, numel: int, dtype: torch.dtype) -> int:
    """The byte model: param and grad in their dtype, states in theirs; clipping adds a read of g
    for the norm, and clip_grad_norm_ a read and a write of g to scale it."""
    p = torch.finfo(dtype).bits // 8
    if impl.endswith("AdamW8bit"):  # torchao's, bitsandbytes': m and v as codes and a scale per 256
        return numel * 3 * p + 2 * 2 * (numel + 4 * -(-numel // 256))
    if impl.startswith("AdamW"):
        clip = 3 * p if "clip" in impl else 0
        return numel * (2 * p + p + 2 * 2 * p + clip)  # read p, g, m, v; write p, m, v (states in p's dtype)
    clip = p if "max_grad_norm" in impl else 0
    if "8-bit state" in impl:  # codes, and a float32 scale per 256 elements, of each of m, v, s
        return numel * (2 * p + p + clip) + 2 * 3 * (numel + 4 * codebook.blocks(numel))
    s = 2 if "bf16 state" in impl else 4
    return numel * (2 * p + p + 2 * 3 * s + clip)  # read p, g, m, v, s; write p, m, v, s


class _ClipThenStep:
    """The usual LLM recipe, torch.nn.utils.clip_grad_norm_(params, 1.0) then the optimizer's step."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt
        self.params = [p for g in opt.param_groups for p in g["params"]]

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()


class _Timer:
    """Seconds per call of `fn`, one sample per call, with the ecosystem's timers: on a GPU the
    device time of `triton.testing.do_bench` (CUDA events around each call, the L2 flushed
    between calls, no host synchronization between them: host work that keeps up is hidden, as
    in training), on the CPU `torch.utils.benchmark.Timer` (its clock and thread setting)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None], steps: int) -> list[float]:
        if self.cuda:
            from triton.testing import do_bench

            # do_bench sizes its run in milliseconds: ask for about `steps` calls of fn
            estimate = max(sync_latency(fn, 1)[0] * 1e3, 1e-3)
            return [ms / 1e3 for ms in do_bench(fn, warmup=1, rep=max(1, int(steps * estimate)), return_mode="all")]
        from torch.utils.benchmark import Timer

        timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return [timer.timeit(1).times[0] for _ in range(steps)]


def sync_latency(fn: Callable[[], None], steps: int) -> list[float]:
    """Seconds from the call of `fn` to its work done on the device (a CUDA synchronization per
    call): what one step costs a loop that waits for it, host work included."""
    out = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def copy_bandwidth(device: torch.device, numel: int, reps: int = 10) -> float:
    """GB/s of the best of a copy and an in-place scale (each element read and written once):
    the roofline. In place matters on CPUs, where a copy's destination is also read (write
    allocate) while an optimizer's in-place updates are not."""
    x = torch.randn(numel, device=device)
    y = torch.empty_like(x)
    timer = _Timer(device)
    best = min(statistics.median(timer(fn, reps + 2)[2:]) for fn in (lambda: y.copy_(x), lambda: x.mul_(0.999)))
    return 2 * x.numel() * 4 / best / 1e9


def _implementations(device: torch.device, dtype: torch.dtype, numel: int = 0) -> dict[str, Callable]:
    impls: dict[str, Callable] = {
        "AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True),
        "AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
        "AdamW fused + clip_grad_norm_": lambda ps: _ClipThenStep(torch.optim.AdamW(ps, fused=True)),
    }
    probe = torch.nn.Parameter(torch.zeros(1, device=device, dtype=dtype))
    fused = SNRAdamW([probe]).backend_of(probe)
    if fused != "eager":
        impls[f"SNRAdamW {fused}"] = lambda ps: SNRAdamW(ps, backend=fused)
        impls[f"SNRAdamW {fused} bf16 state"] = lambda ps: SNRAdamW(ps, backend=fused,
                                                                    state_dtype=torch.bfloat16)
        impls[f"SNRAdamW {fused} max_grad_norm"] = lambda ps: SNRAdamW(ps, backend=fused, max_grad_norm=1.0)
        if dtype == torch.bfloat16:  # AdamW's states follow bf16 params: these move its 20 B per element
            impls[f"SNRAdamW {fused} bf16 state max_grad_norm"] = lambda ps: SNRAdamW(
                ps, backend=fused, state_dtype=torch.bfloat16, max_grad_norm=1.0)
    probe_8bit = SNRAdamW([probe], state_dtype=torch.uint8).backend_of(probe)
    if probe_8bit != "eager" or numel <= EAGER_MAX:
        impls[f"SNRAdamW {probe_8bit} 8-bit state"] = lambda ps: SNRAdamW(ps, backend=probe_8bit,
                                                                          state_dtype=torch.uint8)
    if numel <= EAGER_MAX:
        impls["SNRAdamW eager"] = lambda ps: SNRAdamW(ps, backend="eager")
    if dtype == torch.float32:
        impls.update(_other_8bit_adamw())
    return impls


def _other_8bit_adamw() -> dict[str, Callable]:
    """torchao's and bitsandbytes' AdamW8bit, where they install (8-bit states' neighbours)."""
    found: dict[str, Callable] = {}
    try:
        from torchao.optim import AdamW8bit

        found["torchao AdamW8bit"] = lambda ps: AdamW8bit(ps)
    except Exception:  # not installed, or built for another torch
        pass
    try:
        import bitsandbytes

        found["bitsandbytes AdamW8bit"] = lambda ps: bitsandbytes.optim.AdamW8bit(ps)
    except Exception:
        pass
    return found


def _peak_extra(device: torch.device, step: Callable[[], None]) -> float:
    """Bytes allocated during one step above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    try:  # Linux: VmHWM is the peak resident set; writing 5 to clear_refs resets it
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status("VmRSS")
        step()
        return float(_proc_status("VmHWM") - before)
    except OSError:
        return float("nan")


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(key)


def bench_size(device: torch.device, numel: int, dtype: torch.dtype, steps: int,
               rounds: int = 4) -> tuple[list[Row], dict[str, float]]:
    gen = torch.Generator(device).manual_seed(0)  # on the device: a 1G-param draw on the host takes seconds
    impls = _implementations(device, dtype, numel)
    runs = {}
    for name, make in impls.items():
        p = torch.nn.Parameter(torch.randn(numel, generator=gen, device=device).to(dtype))
        p.grad = (torch.randn(numel, generator=gen, device=device) * 1e-3).to(dtype)
        opt = make([p])
        opt.step()  # warm-up: state, tables, compilation
        runs[name] = opt
    timer = _Timer(device)
    samples: dict[str, list[float]] = {name: [] for name in impls}
    per_round = max(1, steps // rounds)
    for _ in range(rounds):  # round robin, so drifts in machine load hit every implementation alike
        for name, opt in runs.items():
            samples[name] += timer(opt.step, per_round)
    peak = {name: max(0.0, _peak_extra(device, opt.step)) for name, opt in runs.items()}
    synced = {name: statistics.median(sync_latency(opt.step, 5)) if device.type == "cuda" else None
              for name, opt in runs.items()}
    del runs
    copy = copy_bandwidth(device, 36 * numel // 8)  # moves the bytes of an fp32 SNRAdamW step
    in_cache = 20 * numel < 4 * cache_bytes(device)  # working set (theta, g, m, v, s) under 4x the LLC
    base = statistics.median(samples["AdamW fused"])
    rows = []
    for name, s in samples.items():
        t = statistics.median(s)
        nbytes = _bytes(name, numel, dtype)
        gbps = nbytes / t / 1e9
        rows.append(Row(device.type, numel, str(dtype).replace("torch.", ""), name, t * 1e3, nbytes, gbps,
                        t / base, copy, 100 * gbps / copy, in_cache, 1e3 * (synced[name] or t)))
    return rows, peak


def host_overhead(device: torch.device, tensors: int = 1000, steps: int = 20) -> dict[str, dict[str, float]]:
    """Milliseconds per step for `tensors` tiny tensors (all host work, no bandwidth), interleaved
    side by side: with the same grad objects every step, and with fresh ones (what
    `zero_grad()` + backward gives; only the step is timed). The clipping rows are there for
    max_grad_norm's fixed cost (the norm, its coefficient, the skip), measured against
    clip_grad_norm_'s."""
    out: dict[str, dict[str, float]] = {"same grads": {}, "fresh grads": {}}
    impls = {k: v for k, v in _implementations(device, torch.float32, 0).items()
             if "bf16 state" not in k and "AdamW8bit" not in k}
    runs = {}
    for name, make in impls.items():
        ps = [torch.nn.Parameter(torch.randn(8, device=device)) for _ in range(tensors)]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = make(ps)
        opt.step()
        runs[name] = (ps, opt, {"same grads": [], "fresh grads": []})
    timer = _Timer(device)
    for _ in range(steps):
        for name, (ps, opt, samples) in runs.items():
            samples["same grads"] += timer(opt.step, 1)
            for p in ps:
                p.grad = torch.randn_like(p)
            samples["fresh grads"] += timer(opt.step, 1)
    for name, (_, _, samples) in runs.items():
        for kind, values in samples.items():
            out[kind][name] = 1e3 * statistics.median(values)
    return out


def _against(name: str, ms: float, times: dict[str, float]) -> str:
    """A row's ratio to fused AdamW, or for a clipping row to fused AdamW + clip_grad_norm_."""
    clipping = "clip" in name or "max_grad_norm" in name
    base = times.get("AdamW fused + clip_grad_norm_" if clipping else "AdamW fused")
    return f" ({ms / base:.2f}x fused{' + clip' if clipping else ''})" if base else ""


def llama_layout() -> list[int]:
    """The tensors of a 6.7B-param Llama (32 layers, d=4096, MLP 11008, vocab 32000): 291 tensors."""
    d, f, vocab = 4096, 11008, 32000
    layer = [d * d] * 4 + [d * f] * 3 + [d] * 2
    return [vocab * d] + layer * 32 + [d, vocab * d]


def layout_host_ms(steps: int = 20) -> dict[str, float]:
    """Host time of a step for the 6.7B-param Llama layout, without its 27 GB: per step, the host
    work is per tensor whatever its size, so 291 8-element tensors with fresh grads stand in (the
    CPU backend's whole step, its tiny kernel included); the block map, the one part that grows
    with the elements (one int32 per block), is built once per active set and timed at the real
    sizes, with stand-in slots that only carry sizes."""
    from types import SimpleNamespace

    from .param_states import BucketStates
    from .tables import BlockMap

    numels = llama_layout()
    ps = [torch.nn.Parameter(torch.randn(8)) for _ in numels]
    opt = SNRAdamW(ps, backend="cpu")
    times = []
    for k in range(steps + 1):
        for p in ps:
            p.grad = torch.randn_like(p)
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    tiny = torch.zeros(4)
    slots = [SimpleNamespace(real=(tiny, tiny, tiny), scales=None, numel=n, index=i, seed=i, dense=True, contiguous=True,
                             real_stride=(1,)) for i, n in enumerate(numels)]
    bucket = BucketStates({}, torch.device("cpu"), torch.float32, torch.float32)
    builds = {}
    for block in (1024, 1 << 15):  # the Triton kernel's block, the C kernel's chunk
        t = time.perf_counter()
        BlockMap(bucket, slots, block)
        builds[block] = time.perf_counter() - t
    return {"params": float(sum(numels)), "tensors": float(len(numels)),
            "step_host_ms": 1e3 * statistics.median(times[1:]),
            "map_build_ms_block_1024": 1e3 * builds[1024], "map_build_ms_block_32768": 1e3 * builds[1 << 15]}


def first_step_seconds() -> dict[str, float]:
    """Time of the first step in a fresh process: the CPU kernel cold (compiled into an empty
    cache) and warm (cached library), for 1M params."""
    code = ("import time,torch;from snr_triton import SNRAdamW;p=torch.nn.Parameter(torch.randn(1<<20));"
            "p.grad=torch.randn(1<<20);t=time.perf_counter();o=SNRAdamW([p]);o.step();"
            "print(time.perf_counter()-t)")
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, SNR_TRITON_CACHE=cache)
        for label in ("cold (compile)", "warm (cached)"):
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            out[label] = float(proc.stdout.strip()) if proc.returncode == 0 else float("nan")
    return out


def run(devices: list[str], sizes: list[int] | None, steps: int, dtypes: list[str],
        json_path: str | None) -> int:
    from tqdm import tqdm

    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "devices": {}}
    for dev_name in devices:
        device = torch.device(dev_name)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
        cuda = device.type == "cuda"
        timer = ("device time (triton.testing.do_bench); synced = one step waited for, host work included"
                 if cuda else "torch.utils.benchmark.Timer")
        print(f"\n## {device.type}: {name}; {torch.get_num_threads()} threads; median of {steps} steps per "
              f"cell, {timer}; copy = GB/s of a copy moving the bytes of an fp32 SNRAdamW step, measured beside "
              "it\n", flush=True)
        header = ["params", "dtype", "implementation", "ms/step", "bytes/step", "GB/s", "x fused AdamW",
                  "copy GB/s", "% of copy", "peak extra MB"] + (["synced ms/step"] if cuda else [])
        # each cell's rows are printed as it ends: a run cut off by a time limit keeps what it measured
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
        rows_all = []
        cells = [(n, dt) for n in (sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)) for dt in dtypes]
        for numel, dt in tqdm(cells, desc=f"bench {device.type}", unit="cell", leave=False):
            try:
                rows, peak = bench_size(device, numel, getattr(torch, dt), steps)
            except torch.OutOfMemoryError as error:  # the largest cells hold every implementation at once
                print(f"| {format_size(numel)} | {dt} | out of memory: {str(error).splitlines()[0]} |", flush=True)
                continue
            finally:
                # the cell's tensors freed before the next cell allocates: those a failed cell's
                # traceback holds, and any an optimizer keeps in reference cycles (a 2-dtype 128M
                # run on a 24 GB CPU machine was once killed for memory in its second cell)
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            lines = []
            for r in rows:
                size = format_size(r.numel) + (" (in cache)" if r.in_cache else "")
                lines.append(f"| {size} | {r.dtype} | {r.impl} | {r.ms:.3f} | {r.bytes_per_step / 1e6:.0f} MB | "
                             f"{r.gbps:.1f} | {r.ratio:.2f} | {r.copy_gbps:.1f} | {r.roofline_pct:.0f}% | "
                             f"{peak[r.impl] / 2**20:.1f} |" + (f" {r.sync_ms:.3f} |" if cuda else ""))
                rows_all.append({**asdict(r), "peak_extra_bytes": peak[r.impl]})
            tqdm.write("\n".join(lines))
        overhead = host_overhead(device)
        for kind, times in overhead.items():
            print(f"\nHost overhead, 1000 tensors of 8 elements, {kind}, ms/step: "
                  + ", ".join(f"{k} {v:.2f}{_against(k, v, times)}" for k, v in times.items()))
        entry = {"name": name, "rows": rows_all, "host_overhead_ms": overhead}
        if device.type == "cpu":
            layout = layout_host_ms()
            print(f"\nHost time, the 6.7B-param Llama layout ({int(layout['tensors'])} tensors, fresh grads): "
                  f"{layout['step_host_ms']:.2f} ms/step; its block map, built once per active set: "
                  f"{layout['map_build_ms_block_1024']:.0f} ms (Triton's 1,024-element blocks), "
                  f"{layout['map_build_ms_block_32768']:.1f} ms (the C kernel's chunks)")
            entry["llama_6_7b_layout"] = layout
            first = first_step_seconds()
            print("First step, 1M params, fresh process (SNRAdamW cpu kernel), s: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in first.items()))
            entry["first_step_s"] = first
        report["devices"][device.type] = entry
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {json_path}")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"
