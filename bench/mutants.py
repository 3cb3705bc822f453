"""Hand-written mutants of the kernels and the core, each run against the tests meant to catch it.

    python bench/mutants.py [--only NAME ...] [--markdown TESTING-table.md]

Each mutant is one small defect a real bug could be (a sign, a dropped term, the thread split,
the masked tail, the t = 1 rule, the bf16 store, a skipped check), applied to a copy of the
repository (kernels included: the copy's `snr_triton/kernels` points at its own `kernels/`, and
the C kernel compiles into a fresh cache), then the named tests run on the copy. A mutant is
killed when they fail. Not run in CI (minutes, not seconds); TESTING.md has the last score.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    name: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]


C = "kernels/snr_adamw_cpu.c"
TRITON = "kernels/snr_adamw.py"
CPU_TESTS = ("tests/test_backends.py", "tests/test_cpu.py", "tests/test_between_steps.py")
TRITON_TESTS = ("tests/test_backends.py", "tests/test_triton.py", "tests/test_between_steps.py", "tests/test_amp.py")

EIGHT_BIT_TESTS = ("tests/test_8bit_states.py", "tests/test_cpu.py")

RESHARDED = "tests/test_distributed.py::test_a_param_resharded_in_place_between_steps_keeps_its_states"
MUTANTS = [
    # the C kernel
    Mutant("c: 8-bit scale skips a NaN", C, "    a = nan ? NAN : a;\n", "", EIGHT_BIT_TESTS),
    Mutant("c: 8-bit ties to the upper code", C, "const int32_t above = low > (entry >> 8);",
           "const int32_t above = low >= (entry >> 8);", EIGHT_BIT_TESTS),
    Mutant("c: 8-bit negative y's low bits compared as a positive's", C, "low = (bits ^ (bits >> 31)) &",
           "low = bits &", EIGHT_BIT_TESTS),
    Mutant("c: 8-bit scale pointer not advanced per chunk", C,
           "(float *)(intptr_t)row[ROW_EXP_AVG_SCALES_ADDR] + start / CODE_BLOCK;",
           "(float *)(intptr_t)row[ROW_EXP_AVG_SCALES_ADDR];", EIGHT_BIT_TESTS),
    Mutant("c: 8-bit decode with the unsigned table for m", C,
           "decode_block(mc + off + b, ms[blk], sgn,", "decode_block(mc + off + b, ms[blk], uns,", EIGHT_BIT_TESTS),
    # the VBMI decode (run where the CPU has AVX-512 VBMI; elsewhere the scalar path is compiled)
    Mutant("c: VBMI decode blends the table halves the wrong way", C, "b[k] = _mm512_mask_blend_epi8(high, lo, hi);",
           "b[k] = _mm512_mask_blend_epi8(high, hi, lo);", EIGHT_BIT_TESTS),
    Mutant("c: VBMI decode without the shuffle before the unpacks", C,
           "const __m512i x = _mm512_permutexvar_epi8(perm, _mm512_loadu_si512(codes + i));",
           "const __m512i x = _mm512_loadu_si512(codes + i);", EIGHT_BIT_TESTS),
    Mutant("c: VBMI decode's tail from the block's start", C, "decode_scalar(codes + i, scale, c->values, out + i, n - i);",
           "decode_scalar(codes, scale, c->values, out + i, n - i);", EIGHT_BIT_TESTS),
    Mutant("c: VBMI decode's planes from the wrong byte", C, "c->planes[k][i] = (uint8_t)(u >> (8 * k));",
           "c->planes[k][i] = (uint8_t)(u >> (8 * (3 - k)));", EIGHT_BIT_TESTS),
    Mutant("c: 8-bit zero block divides by 0", C, "const float d = a == 0.0f ? 1.0f : a;", "const float d = a;",
           EIGHT_BIT_TESTS),
    Mutant("c: 8-bit lookup drops the sign", C, "+ (bits < 0 ? LUT_HALF : 0);", "+ 0;", EIGHT_BIT_TESTS),
    Mutant("8-bit: a packed entry's negative threshold not reversed", "snr_triton/codebook.py",
           "low = torch.where(torch.arange(2 * LUT_HALF) >= LUT_HALF, ~low & ((1 << LOW_BITS) - 1), low)",
           "low = low", EIGHT_BIT_TESTS),
    Mutant("8-bit: thresholds rounded up, not down", "snr_triton/codebook.py",
           "torch.where(down.double() > exact, lower, down)", "down", EIGHT_BIT_TESTS),
    Mutant("8-bit: a zero block encoded from 0 / 0", "snr_triton/codebook.py",
           "y = values / torch.where(per == 0, 1.0, per)", "y = values / per", EIGHT_BIT_TESTS),
    Mutant("8-bit: the reference's nearest code ties upward", "snr_triton/reference.py",
           "(y[:, None] - q[None, :]).abs().argmin(1)", "(y[:, None] - q[None, :]).abs().flip(1).argmin(1).neg().add(255)",
           EIGHT_BIT_TESTS),
    Mutant("8-bit: a checkpoint's codes copied whatever their layout", "snr_triton/param_states.py",
           "if self.scales is not None and not other and codes.stride() == self.real[i].stride():",
           "if self.scales is not None and not other:",
           EIGHT_BIT_TESTS),
    Mutant("c: thread split", C, "stats, nchunks * i / threads, nchunks * (i + 1) / threads",
           "stats, nchunks / threads * i, nchunks / threads * (i + 1)", ("tests/test_cpu.py",)),
    Mutant("c: norm pass thread split", C, "block, nchunks * i / threads, nchunks * (i + 1) / threads",
           "block, nchunks / threads * i, nchunks / threads * (i + 1)", ("tests/test_clipping.py",)),
    Mutant("c: update sign", C, "* decay - step_size * update", "* decay + step_size * update", CPU_TESTS),
    Mutant("c: weight decay dropped", C, "LOADP(param[i]) * decay -", "LOADP(param[i]) -", CPU_TESTS),
    Mutant("c: s before m dropped", C, "(omrho * diff) * diff", "(omrho * g) * g", CPU_TESTS),
    # 2026-12-06: the selects written so that gcc vectorizes them on AVX2 too
    Mutant("c: rho = 0 keeps the old s", C, "rho != 0.0f ? LOADS(s_buf[i]) : 0.0f", "LOADS(s_buf[i])", CPU_TESTS),
    Mutant("c: the hard gate's mask passes every coordinate", C, "bits_float(float_bits(adam) & -above)", "adam",
           CPU_TESTS),
    Mutant("c: the hard gate's q is 1 everywhere", C, "GATE == GATE_HARD ? (float)above", "GATE == GATE_HARD ? 1.0f",
           CPU_TESTS + ("tests/test_monitor.py",)),
    Mutant("c: t = 1 rule dropped", C, "const float ys = FIRST ? x : (ys0 < FLT_MAX ? ys0 : FLT_MAX);",
           "const float ys = ys0 < FLT_MAX ? ys0 : FLT_MAX;", CPU_TESTS),
    Mutant("c: chunk tail short by one", C, "n = left < w->block ? left : w->block;\n        char *param",
           "n = (left < w->block ? left : w->block) - 1;\n        char *param", CPU_TESTS),
    Mutant("c: bf16 store truncates", C, "return (uint16_t)((x.u + 0x7FFF + ((x.u >> 16) & 1)) >> 16);",
           "return (uint16_t)(x.u >> 16);", CPU_TESTS),
    Mutant("c: warmup off by one", C, "if (t <= (double)h->warmup_steps)", "if (t < (double)h->warmup_steps)",
           CPU_TESTS),
    Mutant("c: overflow-safe scale dropped", C, "const float r = bits_float((253 - e) << 23);", "const float r = 1.0f;",
           CPU_TESTS),
    Mutant("c: scale exponent unclamped", C, "e = e0 < 252 ? e0 : 252", "e = e0", CPU_TESTS),
    Mutant("c: gate's 0/0 floor dropped", C, "dd = dd0 > FLT_MIN ? dd0 : FLT_MIN", "dd = dd0", CPU_TESTS),
    Mutant("c: m from m alone (lerp's second branch dropped)", C, "m = (lerp_low ? m : g) + lerp_w * diff;",
           "m = m + omb1 * diff;", CPU_TESTS + ("tests/test_properties.py",)),
    Mutant("c: sqrt(s)'s exponent from the raw bits (int overflow)", C, "((es + 127) >> 1) + b_scale_exp",
           "((float_bits(s) + (127 << 23)) >> 24) + b_scale_exp", CPU_TESTS + ("tests/test_properties.py",)),
    Mutant("c: the gate's coefficient left out of the scale", C,
           "b_scale_exp = coef > 0 ? b_scale_exponent(bc1 / sqrt(bc3) * sqrt(coef)) : -(1 << 20);",
           "b_scale_exp = b_scale_exponent(bc1 / sqrt(bc3));", CPU_TESTS + ("tests/test_properties.py",)),
    Mutant("c: b_scale dropped from y", C, "const double b_scale_sq = FIRST ? 1.0 : bc1 * bc1 / bc3;",
           "const double b_scale_sq = 1.0;", CPU_TESTS),
    Mutant("c: norm pass overflow fallback dropped", C, "if (!isfinite(sum)) {", "if (0) {", ("tests/test_clipping.py",)),
    Mutant("c: norm pass run dropped", C, "lanes[j] += run[j];", "lanes[j] = run[j];", ("tests/test_clipping.py",)),
    # the Triton kernel (interpreted)
    Mutant("triton: the gate's 1/c unbounded (subnormal m)", TRITON,
           "    inv = tl.minimum(1.0 / tl.where(nonzero, c, 1.0), 3.4028234663852886e38)",
           "    inv = 1.0 / tl.where(nonzero, c, 1.0)", ("tests/test_between_steps.py",)),
    Mutant("triton: 8-bit scale skips a NaN", TRITON, "propagate_nan=tl.PropagateNan.ALL",
           "propagate_nan=tl.PropagateNan.NONE", EIGHT_BIT_TESTS),
    Mutant("triton: update sign", TRITON, "p = p - (lr / bc1) * (q * m / denom)", "p = p + (lr / bc1) * (q * m / denom)",
           TRITON_TESTS),
    Mutant("triton: 8-bit ties to the upper code", TRITON, "tl.where(low > (entry >> 8), 1, 0)",
           "tl.where(low >= (entry >> 8), 1, 0)", ("tests/test_8bit_states.py",)),
    Mutant("triton: 8-bit negative y's low bits compared as a positive's", TRITON,
           "low = (bits ^ (bits >> 31)) & LUT_LOW_MASK", "low = bits & LUT_LOW_MASK", ("tests/test_8bit_states.py",)),
    Mutant("triton: masked tail short by one", TRITON, "mask = offs < numel", "mask = offs < numel - 1", TRITON_TESTS),
    Mutant("triton: t = 1 rule dropped", TRITON, "b = tl.where(first, a, tl.sqrt_rn(s) * bc1_over_sqrt_bc3)",
           "b = tl.sqrt_rn(s) * bc1_over_sqrt_bc3", TRITON_TESTS),
    Mutant("triton: bf16 store truncates", TRITON, "        x = _round_bf16(x)\n", "        x = x.to(tl.bfloat16)\n",
           TRITON_TESTS),
    Mutant("triton: weight decay dropped", TRITON, "p = p * (1.0 - lr * weight_decay)", "p = p", TRITON_TESTS),
    Mutant("triton: warmup off by one", TRITON, "q = tl.where(t <= warmup_steps, 1.0, q)",
           "q = tl.where(t < warmup_steps, 1.0, q)", TRITON_TESTS),
    Mutant("triton: found_inf ignored", TRITON, "numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)",
           "numel = numel", TRITON_TESTS),
    Mutant("triton: the C = 0 guard dropped", TRITON, "q = tl.where(nonzero, q, 0.0)  # m = s = 0", "q = q",
           TRITON_TESTS + ("tests/test_monitor.py",)),
    Mutant("triton: the soft gate's 0/0 floor dropped", TRITON,
           "q = d / tl.maximum(d + (softness / k_pos) * yk + tail, 1.1754943508222875e-38)",
           "q = d / (d + (softness / k_pos) * yk + tail)", TRITON_TESTS),
    Mutant("triton: the gate's coefficient left out of the scale", TRITON,
           "bk = tl.where(k > 0.0, b * tl.sqrt_rn(k), 0.0)", "bk = b", TRITON_TESTS + ("tests/test_properties.py",)),
    Mutant("triton: m from m alone (lerp's second branch dropped)", TRITON,
           "m = tl.where(one_minus_beta1 < 0.5, m + one_minus_beta1 * diff, g - diff * (1.0 - one_minus_beta1))",
           "m = m + one_minus_beta1 * diff", TRITON_TESTS + ("tests/test_properties.py",)),
    Mutant("eager: the gate's coefficient left out of the scale", "snr_triton/backend/eager.py",
           "b = [bi * weight**0.5 if weight > 0 else torch.zeros_like(bi) for bi in b]", "weight = 1.0",
           ("tests/test_properties.py",)),
    # the Python core
    Mutant("eager: the gate's 1/c unbounded (subnormal m)", "snr_triton/backend/eager.py",
           "        torch._foreach_clamp_max_(inv, _HUGE)\n", "", ("tests/test_between_steps.py",)),
    Mutant("reference: s-hat without bias correction", "snr_triton/reference.py", "shat = s / (1 - rho**t)",
           "shat = s", ("tests/test_reference.py",)),
    Mutant("eager: rho for 1 - rho", "snr_triton/backend/eager.py", "torch._foreach_addcmul_(s, torch._foreach_mul(diff, 1 - rho), diff)",
           "torch._foreach_addcmul_(s, torch._foreach_mul(diff, rho), diff)", ("tests/test_backends.py",)),
    Mutant("slot: shape check dropped", "snr_triton/param_states.py", "and not g.is_sparse and p.shape == self.shape and",
           "and not g.is_sparse and", ("tests/test_between_steps.py",)),
    Mutant("slot: edits not noticed", "snr_triton/param_states.py", "        if slot is not None:\n            slot.edited = True",
           "        if slot is not None:\n            pass", ("tests/test_between_steps.py",)),
    Mutant("optimizer: a frozen param's edited entry not noticed", "snr_triton/optimizer.py",
           "            stale = [slot for p, slot in self._slots.items() if state.get(p) is not slot.entry]",
           "            stale = []", ("tests/test_between_steps.py",)),
    Mutant("optimizer: a replaced slot kept in its old group's record", "snr_triton/optimizer.py",
           "        self._unrecord(replaced)\n", "", ("tests/test_between_steps.py",)),
    Mutant("optimizer: a forgotten slot kept in its group's record", "snr_triton/optimizer.py",
           "            record[1] = [None if id(s) in gone else s for s in record[1]]", "            pass",
           ("tests/test_between_steps.py",)),
    Mutant("tables: addresses never refreshed", "snr_triton/tables.py", "        if key == self.addresses:\n            return",
           "        if self.addresses is not None:\n            return", ("tests/test_between_steps.py",)),
    Mutant("stats: skipped step counted", "snr_triton/optimizer.py", "                table[:, 0] = 0  # the step was skipped",
           "                pass  # the step was skipped", ("tests/test_monitor.py",)),
    Mutant("hyperparams: mixed betas accepted", "snr_triton/hyperparams.py",
           "        if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):",
           "        if False:", ("tests/test_between_steps.py",)),
    Mutant("hyperparams: a step refuses the mixed betas a scheduler writes", "snr_triton/hyperparams.py",
           '    _check_betas(group["betas"])\n', '    _check_betas(group["betas"])\n    check_betas_kinds(group["betas"])\n',
           ("tests/test_between_steps.py",)),
    Mutant("optimizer: a step without grads keeps the last step's norm", "snr_triton/optimizer.py",
           '                self._last["grad_norm"] = torch.zeros((), device=self._first_param_device())',
           "                pass", ("tests/test_clipping.py",)),
    Mutant("optimizer: duplicate params accepted", "snr_triton/optimizer.py", "            if id(p) in seen:",
           "            if False:", ("tests/test_between_steps.py",)),
    Mutant("load: exp_grad_var from beta2 for rho", "snr_triton/param_states.py", "(hyper.beta1, hyper.beta2), hyper.rho))",
           "(hyper.beta1, hyper.beta2), hyper.beta2))", ("tests/test_optimizer_api.py",)),
    # max_grad_norm's coefficient (snr_triton/clipping.py): torch ops (the eager backend's), the
    # host's floats (the C backend's), the one-program kernel (the Triton backend's)
    Mutant("clip: norm not unscaled", "snr_triton/clipping.py",
           "norm = total.sqrt() if scale is None else total.sqrt() / scale", "norm = total.sqrt()",
           ("tests/test_clipping.py",)),
    Mutant("clip: coefficient not clamped to 1", "snr_triton/clipping.py",
           "k = (max_norm / (norm + 1e-6)).clamp(max=1.0)", "k = max_norm / (norm + 1e-6)", ("tests/test_clipping.py",)),
    Mutant("clip: non-finite norm not skipped", "snr_triton/clipping.py",
           "bad = (~torch.isfinite(norm)).float()", "bad = torch.zeros_like(norm).float()", ("tests/test_clipping.py",)),
    Mutant("clip (host): coefficient not clamped to 1", "snr_triton/clipping.py",
           "k = min(_divide(1.0, norm + 1e-6) * max_norm, 1.0) if not bad else 1.0",
           "k = _divide(1.0, norm + 1e-6) * max_norm if not bad else 1.0", ("tests/test_clipping.py",)),
    Mutant("clip (host): norm not unscaled", "snr_triton/clipping.py", "        norm = _divide(norm, scale)\n",
           "        pass\n", ("tests/test_clipping.py",)),
    Mutant("clip (triton): norm not unscaled", TRITON, "        norm = norm / scale\n", "        pass\n",
           ("tests/test_clipping.py",)),
    Mutant("clip (triton): a non-finite norm not added to found_inf", TRITON,
           "found = tl.where(bad, 1.0, 0.0).to(tl.float32)", "found = tl.where(bad, 0.0, 0.0).to(tl.float32)",
           ("tests/test_clipping.py",)),
    Mutant("clip: a DTensor's norm not summed over the mesh", "snr_triton/optimizer.py",
           "                    partial = _sum_over_shards(partial, *part[3])", "                    pass",
           ("tests/test_distributed.py::test_fsdp2_clipping_in_the_step_equals_clip_grad_norm_in_one_process",)),
    Mutant("clip: accepted under ZeroRedundancyOptimizer", "snr_triton/optimizer.py",
           "if max_grad_norm is not None and _built_by_zero_redundancy_optimizer():", "if False:",
           ("tests/test_distributed.py::test_max_grad_norm_under_zero_redundancy_optimizer_is_refused",)),
    Mutant("triton: norm pass drops the tail", TRITON, "g = tl.load(g_base + offs, mask=offs < numel, other=0.0)",
           "g = tl.load(g_base + offs, mask=offs < numel - 1, other=0.0)", ("tests/test_clipping.py",)),
    Mutant("dtensor: a slot kept when its param's placements changed", "snr_triton/param_states.py",
           "(p.device_mesh, p.placements) == self.placements)", "(p.device_mesh, p.placements) != self.placements)",
           (RESHARDED,)),
    Mutant("dtensor: states of another layout not redistributed", "snr_triton/param_states.py",
           "    return t.redistribute(p.device_mesh, p.placements) if resharded(t, p) else t", "    return t",
           (RESHARDED,)),
    Mutant("dtensor: a checkpoint's scales with too few blocks taken", "snr_triton/param_states.py",
           "return row[:blocks] if row.numel() >= blocks else None", "return row[:blocks]", (RESHARDED,)),
    Mutant("dtensor: a resharded state's shape compared by its local shard", "snr_triton/optimizer.py",
           "if (tuple(value.shape) != _shown_shape(p, value)) if resharded(value, p) else \\",
           "if (as_real(value).shape != as_real(p).shape and value.shape != p.shape) if True else \\",
           (RESHARDED,)),
    Mutant("dtensor: a state on another mesh not refused", "snr_triton/optimizer.py",
           "if is_dtensor(t) and is_dtensor(p) and t.device_mesh != p.device_mesh:", "if False:", (RESHARDED,)),
    Mutant("compile: the block map keyed by param and grad addresses alone", "snr_triton/tables.py",
           "key = addresses if states is None else addresses + states + (scales or [])", "key = addresses",
           ("tests/test_compile.py::test_the_step_op_steps_copies_of_the_states_it_is_handed",)),
    Mutant("cache: symlinks followed", "snr_triton/backend/kernel_cache.py", "fd = os.open(path, os.O_RDONLY | NOFOLLOW)",
           "fd = os.open(path, os.O_RDONLY)", ("tests/test_cache_security.py",)),
    Mutant("cache: any directory trusted", "snr_triton/backend/kernel_cache.py", "    if reason is None:\n        return root",
           "    if True:\n        return root", ("tests/test_cache_security.py",)),
    Mutant("clip: FSDP1's params not refused at construction", "snr_triton/optimizer.py",
           "        if max_grad_norm is not None:\n            _check_not_sharded_by_fsdp1(", "        if False:\n            _check_not_sharded_by_fsdp1(",
           ("tests/test_distributed.py::test_fsdp1_params_refuse_max_grad_norm_and_step_like_adamw_after_fsdps_clip",)),
    Mutant("clip: FSDP1's params not refused in add_param_group", "snr_triton/optimizer.py",
           "        if self.defaults.get(\"max_grad_norm\") is not None:  # set after", "        if False:  # set after",
           ("tests/test_distributed.py::test_fsdp1_params_refuse_max_grad_norm_and_step_like_adamw_after_fsdps_clip",)),
    Mutant("clip: FSDP1's params not refused at the step", "snr_triton/optimizer.py",
           "        if self.defaults.get(\"max_grad_norm\") is not None:  # wrapped by FSDP1 after",
           "        if False:  # wrapped by FSDP1 after",
           ("tests/test_distributed.py::test_fsdp1_params_refuse_max_grad_norm_and_step_like_adamw_after_fsdps_clip",)),
    # a step's validation once per distinct set of a group's plain values (hyperparams.step_hyper)
    Mutant("hyperparams: validated values keyed without their types", "snr_triton/hyperparams.py",
           "    return tuple(map(type, values)), tuple(values)", "    return (), tuple(values)",
           ("tests/test_bad_input.py",)),
    Mutant("hyperparams: last step's settings compared by their types alone", "snr_triton/hyperparams.py",
           "and last[0] == key:", "and last[0][0] == key[0]:", ("tests/test_between_steps.py",)),
    Mutant("hyperparams: tensor betas validated once", "snr_triton/hyperparams.py",
           "        if any(isinstance(b, torch.Tensor) for b in betas):\n            return None\n", "",
           ("tests/test_between_steps.py::test_tensor_betas_changed_in_place_between_steps_step_like_adamw",)),
    Mutant("hyperparams: a step keeps the lr it validated first", "snr_triton/hyperparams.py",
           "            hyper = replace(hyper, lr=float(lr))", "            pass",
           ("tests/test_between_steps.py", "tests/test_bad_input.py")),
    Mutant("hyperparams: lr compared by value alone", "snr_triton/hyperparams.py",
           "            if type(lr) is float and lr == hyper.lr:", "            if lr == hyper.lr:",
           ("tests/test_bad_input.py",)),
    # bench/cpu_floor.py's floor passes: a pass that does less than it stands for is no floor
    Mutant("floor: the read pass skips each chunk's tail", "bench/cpu_floor.py",
           "            for (int64_t i = n - n % 32; i < n; i++) total += g[i] * g[i];\n", "",
           ("tests/test_cpu_floor.py",)),
    Mutant("floor: the 9-stream pass leaves s", "bench/cpu_floor.py", "s[i] = 0.99f * s[i] + x * x;", "(void)s;",
           ("tests/test_cpu_floor.py",)),
    Mutant("floor: threads split the chunks short", "bench/cpu_floor.py",
           "chunks * (i + 1) / threads * CHUNK, kind, 0};", "chunks * (i + 1) / threads * CHUNK - 1, kind, 0};",
           ("tests/test_cpu_floor.py",)),
]


def copy_tree(dst: Path) -> None:
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", ".ci-*"))
    (dst / "snr_triton" / "kernels").symlink_to(Path("..") / "kernels")  # the copy's own kernels


def run(mutant: Mutant, timeout: int) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix="snr-mutant-") as tmp:
        tree = Path(tmp) / "repo"
        copy_tree(tree)
        target = tree / mutant.path
        text = target.read_text()
        if text.count(mutant.original) != 1:
            return "stale", 0.0, f"the original text occurs {text.count(mutant.original)} times"
        target.write_text(text.replace(mutant.original, mutant.mutated))
        env = dict(os.environ, PYTHONPATH=str(tree), SNR_TRITON_CACHE=str(Path(tmp) / "cache"), TRITON_INTERPRET="1")
        env["CI"] = "true"  # as CI runs: a backend the mutant made unavailable fails, not skips
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
                                  cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "killed (timeout)", time.perf_counter() - start, ""
        seconds = time.perf_counter() - start
        failed = [ln.split(" - ")[0] for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
        summary = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else [""]
        detail = (failed[0].removeprefix("FAILED ") if failed else summary[0]).replace("|", "/")
        return ("killed" if proc.returncode != 0 else "SURVIVED"), seconds, detail[:120]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="names (substrings) of the mutants to run")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or any(o in m.name for o in args.only)]
    rows = ["| mutant | file | tests | result | s | first failure |", "|---|---|---|---|---|---|"]
    killed = 0
    for m in chosen:
        result, seconds, detail = run(m, args.timeout)
        killed += result.startswith("killed")
        row = f"| {m.name} | `{m.path}` | {', '.join(Path(t).name for t in m.tests)} | {result} | {seconds:.0f} | {detail} |"
        rows.append(row)
        print(row, flush=True)
    summary = f"\n{killed} of {len(chosen)} mutants killed"
    print(summary)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(rows) + "\n" + summary + "\n")
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
