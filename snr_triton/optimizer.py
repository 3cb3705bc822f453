"""SNRAdamW: AdamW whose every coordinate is gated by its signal-to-noise ratio.

A drop-in `torch.optim.Optimizer`. The math is ALGORITHM.md; this module only
decides which backend steps which tensors, owns the flat state buffers, and
keeps torch.optim's contracts (state_dict, hooks, GradScaler, AdamW checkpoints).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import hyperparams
from . import cpu_backend
from .eager import eager_step
from .flat_state import FlatState, as_real
from .triton_backend import SEED, SUPPORTED_DTYPES, triton_step, triton_unavailable_reason

# Options that say how to run, not what to compute: a checkpoint never overrides them.
RUNTIME_KEYS = ("backend", "state_dtype", "stochastic_rounding", "track_stats")
# Keys of torch.optim.AdamW groups that have no meaning here.
ADAMW_ONLY_KEYS = ("amsgrad", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")
STAT_KEYS = ("mean_gate", "frac_above", "signal", "noise")


def _real_dtype(t: Tensor) -> torch.dtype:
    return t.real.dtype if t.is_complex() else t.dtype


class SNRAdamW(Optimizer):
    """AdamW with the SNR gate of Litman & Guo (2026); see README for the hyperparameters.

    backend: "auto" (Triton for CUDA tensors, the fused C kernel for CPU tensors, eager for what
        neither serves), "triton", "cpu", "eager".
    state_dtype: torch.float32 (default) or torch.bfloat16 to cut state bytes (every backend).
    stochastic_rounding: round bf16 params stochastically when storing them.
    track_stats: keep the gate statistics of the last step for `stats()`.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), rho: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 1e-2, gate: str = "snr", alpha: float = 1.0,
                 softness: float = 1.0, gate_eps: float = 1e-16, warmup_steps: int = 0,
                 maximize: bool = False, backend: str = "auto", *,
                 state_dtype: torch.dtype = torch.float32, stochastic_rounding: bool = False,
                 track_stats: bool = False):
        defaults = dict(lr=lr, betas=betas, rho=rho, eps=eps, weight_decay=weight_decay, gate=gate,
                        alpha=alpha, softness=softness, gate_eps=gate_eps, warmup_steps=warmup_steps,
                        maximize=maximize, backend=backend, state_dtype=state_dtype,
                        stochastic_rounding=stochastic_rounding, track_stats=track_stats)
        self._validate(defaults)
        self._reset_caches()
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- validation
    @staticmethod
    def _validate(group: dict[str, Any], where: str = "") -> None:
        try:
            hyperparams.validate_group(group)
            hyperparams.validate_backend(group["backend"])
            hyperparams.validate_state_dtype(group["state_dtype"])
            for key in ("stochastic_rounding", "track_stats"):
                if not isinstance(group[key], bool):
                    raise ValueError(f"{key} must be a bool (True or False), got {group[key]!r}")
        except ValueError as e:
            raise ValueError(f"{e}{where}") from None

    def _check_backend(self, group: dict[str, Any], params: Iterable[Tensor], where: str = "") -> None:
        if group["backend"] == "cpu":
            for p in params:
                reason = self._cpu_unavailable(group, p.device, _real_dtype(p))
                if reason:
                    raise RuntimeError(f"backend='cpu' cannot step a {p.dtype} param on {p.device}{where}: "
                                       f"{reason}")
        if group["backend"] != "triton":
            return
        for p in params:
            reason = triton_unavailable_reason(p.device)
            if reason is None and _real_dtype(p) not in SUPPORTED_DTYPES:
                reason = (f"the kernel supports {', '.join(map(str, SUPPORTED_DTYPES))} params; "
                          f"use backend='eager' or 'auto' for {p.dtype}")
            if reason:
                raise RuntimeError(f"backend='triton' cannot step a {p.dtype} param on {p.device}{where}: {reason}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Check a merged copy first: a rejected group must not be half-added.
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        where = f" (param group {len(self.param_groups)})"
        self._validate(merged, where)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        self._check_backend(merged, params, where)
        super().add_param_group({**param_group, "params": params})

    # ----------------------------------------------------------------- state
    def _reset_caches(self) -> None:
        self._flat: dict[tuple, FlatState] = {}
        self._stats: list[tuple | None] = []  # per group: (elements, device sums, found_inf)
        self._generators: dict[torch.device, torch.Generator] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._reset_caches()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ours or a torch.optim.AdamW state dict (its exp_grad_var is derived, ALGORITHM.md)."""
        groups = []
        for i, saved in enumerate(state_dict["param_groups"]):
            group = {k: v for k, v in saved.items() if k not in ADAMW_ONLY_KEYS}
            if saved.get("amsgrad"):
                warnings.warn("loading an AdamW state dict with amsgrad=True: SNRAdamW has no amsgrad; "
                              "max_exp_avg_sq is ignored", stacklevel=2)
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            if i < len(self.param_groups):
                group.update({k: self.param_groups[i][k] for k in RUNTIME_KEYS})
            self._validate(group, f" (param group {i} of the state dict)")
            groups.append(group)
        super().load_state_dict({**state_dict, "param_groups": groups})
        self._reset_caches()
        # Pack now, so state (exp_grad_var of an AdamW checkpoint included) is complete at once.
        for gi, group in enumerate(self.param_groups):
            keys = {(p.device, _real_dtype(p)) for p in group["params"] if p in self.state}
            for key in keys:
                self._flat_state(gi, key, [], group)

    def _flat_state(self, gi: int, key: tuple, active: list[Tensor], group: dict) -> FlatState:
        flat = self._flat.get((gi, key))
        if flat is None or not flat.covers(active):
            chosen = set(active)
            members = [p for p in group["params"]
                       if (p in chosen or p in self.state) and (p.device, _real_dtype(p)) == key]
            flat = FlatState(members, self.state, group, group["state_dtype"])
            self._flat[(gi, key)] = flat
        return flat

    # ----------------------------------------------------------------- the step
    def backend_of(self, param: Tensor) -> str:
        """Which backend steps `param`: "triton", "cpu" or "eager"."""
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return self._backend(group, param.device, _real_dtype(param))
        raise KeyError("param is not in this optimizer")

    @staticmethod
    def _cpu_unavailable(group: dict, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return "it steps CPU tensors only; use backend='triton' or 'auto' on GPUs"
        if dtype not in cpu_backend.SUPPORTED_DTYPES:
            return f"it supports float32 and bfloat16 params; use backend='eager' or 'auto' for {dtype}"
        if group["stochastic_rounding"]:
            return "it has no stochastic rounding; use backend='eager' or 'auto'"
        return cpu_backend.cpu_unavailable_reason()

    def _backend(self, group: dict, device: torch.device, dtype: torch.dtype) -> str:
        choice = group["backend"]
        if choice != "auto":
            return choice  # availability was checked before anything changed
        if device.type == "cuda" and dtype in SUPPORTED_DTYPES and triton_unavailable_reason(device) is None:
            return "triton"
        if self._cpu_unavailable(group, device, dtype) is None:
            return "cpu"
        return "eager"

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scale: Tensor | None = None,
             found_inf: Tensor | None = None):
        """One step. `grad_scale`/`found_inf` (or the attributes GradScaler sets) unscale in the
        same pass and turn the step into a no-op when found_inf is non-zero."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)

        # Check everything before changing anything.
        plan = []
        for gi, group in enumerate(self.param_groups):
            where = f" (param group {gi})"
            self._validate(group, where)
            buckets: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"SNRAdamW does not support sparse gradients{where}; "
                                       "use dense gradients (e.g. nn.Embedding(sparse=False))")
                buckets.setdefault((p.device, _real_dtype(p)), []).append(p)
            for (device, dtype), params in buckets.items():
                self._check_backend(group, params, where)
                plan.append((gi, group, device, dtype, params))

        self._stats = [None] * len(self.param_groups)
        for gi, group, device, dtype, params in plan:
            flat = self._flat_state(gi, (device, dtype), params, group)
            grads = [p.grad for p in params]
            backend = self._backend(group, device, dtype)
            if backend == "triton":
                sums = triton_step(flat, params, grads, group, grad_scale=grad_scale, found_inf=found_inf,
                                   stochastic_rounding=group["stochastic_rounding"],
                                   track_stats=group["track_stats"])
            elif backend == "cpu":
                sums = cpu_backend.cpu_step(flat, params, grads, group, grad_scale=grad_scale,
                                            found_inf=found_inf, track_stats=group["track_stats"])
            else:
                m, v, s, steps = flat.views(params, self.state)
                sums = eager_step([as_real(p) for p in params], [as_real(g) for g in grads], m, v, s,
                                  steps, group, grad_scale=grad_scale, found_inf=found_inf,
                                  stochastic_rounding=group["stochastic_rounding"],
                                  track_stats=group["track_stats"], generator=self._generator(device))
            if sums is not None:
                count = sum(flat.numels[flat.index[p]] for p in params)
                prev = self._stats[gi]
                self._stats[gi] = (count, sums, found_inf) if prev is None else (
                    prev[0] + count, prev[1] + sums.to(prev[1].device), found_inf)
        return loss

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device).manual_seed(SEED)
        return gen

    # ----------------------------------------------------------------- monitor
    def stats(self) -> dict[str, Any]:
        """Gate statistics of the last step over all stepped elements (needs track_stats=True).

        mean_gate: mean of q; frac_above: fraction with m-hat^2 > alpha*s-hat;
        signal: sum of m-hat^2; noise: sum of alpha*s-hat; groups: the same per param group.
        Reading synchronizes with the device once; the step itself never does.
        """
        if not any(g["track_stats"] for g in self.param_groups):
            raise RuntimeError("stats() needs SNRAdamW(..., track_stats=True)")
        per_group = []
        total = None
        for entry in self._stats:
            if entry is None:
                per_group.append(None)
                continue
            count, sums, found_inf = entry
            if found_inf is not None and found_inf.item() != 0:
                count = 0  # the step was skipped: nothing was stepped
            values = torch.cat([torch.tensor([float(count)], dtype=torch.float64), sums.double().cpu()])
            per_group.append(values)
            total = values if total is None else total + values
        return {**_stats_dict(total), "groups": [_stats_dict(v) for v in per_group]}


def _stats_dict(sums: Tensor | None) -> dict[str, float]:
    """sums = (count, sum q, count above, sum signal, sum noise)."""
    if sums is None or sums[0] == 0:
        return {k: float("nan") if k in ("mean_gate", "frac_above") else 0.0 for k in STAT_KEYS}
    count, q, above, signal, noise = (float(x) for x in sums)
    return {"mean_gate": q / count, "frac_above": above / count, "signal": signal, "noise": noise}
