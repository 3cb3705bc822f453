"""SNRAdamW: AdamW whose every coordinate is gated by its signal-to-noise ratio.

A drop-in `torch.optim.Optimizer`. The math is ALGORITHM.md; this module keeps torch.optim's
contracts (param groups, state_dict, hooks, GradScaler, AdamW checkpoints), owns the flat
state buffers, and runs a step in two parts: plan (validate every group, bucket the params,
choose a backend for each bucket, all before anything changes) and run (one call of the
backend interface per bucket, snr_triton/backend/__init__.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backend
from .contract import STATS
from .flat_state import STATE_KEYS, FlatState, as_real
from .hyperparams import DEFAULTS, RUNTIME_DEFAULTS, Hyper, validate_group, validate_runtime

# Keys of torch.optim.AdamW groups that have no meaning here.
ADAMW_ONLY_KEYS = ("amsgrad", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")
STAT_KEYS = ("mean_gate", "frac_above", "signal", "noise")


def _real_dtype(t: Tensor) -> torch.dtype:
    return t.real.dtype if t.is_complex() else t.dtype


@dataclass
class Bucket:
    """The params of one group on one device with one real dtype that have a grad this step."""

    group_index: int
    hyper: Hyper
    device: torch.device
    dtype: torch.dtype
    params: list[Tensor]
    backend: ModuleType | None = None  # None when only packing states (load_state_dict)


class _Exact:
    """Carries a state tensor through Optimizer.load_state_dict, which would otherwise cast every
    floating state to its param's dtype (rounding fp32 moments of a bf16 model to bf16)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


class SNRAdamW(Optimizer):
    """AdamW with the SNR gate of Litman & Guo (2026); see ALGORITHM.md and README for the hyperparameters.

    backend: "auto" (the first available of snr_triton.backend.ORDER: Triton for CUDA tensors,
        the fused C kernel for CPU tensors, eager for what neither serves), "triton", "cpu", "eager".
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
        self._hyper(defaults)
        self._reset_caches()
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- groups
    @staticmethod
    def _hyper(group: dict[str, Any], where: str = "") -> Hyper:
        """Validate a group (ValueError naming the argument and the valid choices) and freeze it."""
        try:
            validate_group(group)
            validate_runtime(group)
        except ValueError as e:
            raise ValueError(f"{e}{where}") from None
        return Hyper.of(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Check a merged copy first: a rejected group must not be half-added.
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        where = f" (param group {len(self.param_groups)})"
        hyper = self._hyper(merged, where)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            p = p[1] if isinstance(p, tuple) else p  # named parameters: (name, tensor)
            if isinstance(p, Tensor):
                self._choose(merged["backend"], p.device, _real_dtype(p), hyper, where)
        super().add_param_group({**param_group, "params": params})

    @staticmethod
    def _choose(name: str, device: torch.device, dtype: torch.dtype, hyper: Hyper, where: str):
        try:
            return backend.choose(name, device, dtype, hyper)
        except RuntimeError as e:
            raise RuntimeError(f"{e}{where}") from None

    def backend_of(self, param: Tensor) -> str:
        """Which backend steps `param`: "triton", "cpu" or "eager"."""
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return backend.choose(group["backend"], param.device, _real_dtype(param), Hyper.of(group))[0]
        raise KeyError("param is not in this optimizer")

    # ----------------------------------------------------------------- state
    def _reset_caches(self) -> None:
        self._flat: dict[tuple, FlatState] = {}
        # The last step's gate statistics: "stats" holds (group index, params, numels, device sums per
        # param). step() only mutates this dict, never assigns an attribute of the optimizer: dynamo
        # in torch 2.11 fails on attribute assignment to an optimizer (pytorch/pytorch#171590).
        self._last: dict[str, Any] = {"stats": [], "found_inf": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # groups saved by an older version: our keys only
            for key, value in self._own_defaults().items():
                group.setdefault(key, value)
        self._reset_caches()

    def _own_defaults(self) -> dict[str, Any]:
        """This optimizer's defaults for its own keys (torch adds others, e.g. `differentiable`)."""
        return {k: self.defaults.get(k, v) for k, v in {**DEFAULTS, **RUNTIME_DEFAULTS}.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ours or a torch.optim.AdamW state dict (its exp_grad_var is derived, ALGORITHM.md).

        States keep their values exactly: they are stored in this optimizer's `state_dtype`
        (a bf16 checkpoint into fp32 states is exact; fp32 into bf16 rounds to nearest), never
        cast to the param's dtype. Everything is checked before anything changes.
        """
        groups = []
        for i, saved in enumerate(state_dict["param_groups"]):
            group = {k: v for k, v in saved.items() if k not in ADAMW_ONLY_KEYS}
            if saved.get("amsgrad"):
                warnings.warn("loading an AdamW state dict with amsgrad=True: SNRAdamW has no amsgrad; "
                              "max_exp_avg_sq is ignored", stacklevel=2)
            for key, value in self._own_defaults().items():
                group.setdefault(key, value)
            if i < len(self.param_groups):  # how to run stays this optimizer's choice
                group.update({k: self.param_groups[i][k] for k in RUNTIME_DEFAULTS})
            self._hyper(group, f" (param group {i} of the state dict)")
            groups.append(group)
        self._check_saved_states(state_dict)
        wrapped = {k: {key: _Exact(v) for key, v in st.items()} for k, st in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "param_groups": groups, "state": wrapped})
        for p, st in self.state.items():
            device = p.device if isinstance(p, Tensor) else None
            self.state[p] = {k: _unwrap(v, device) for k, v in st.items()}
        self._reset_caches()
        # Pack now, so state (exp_grad_var of an AdamW checkpoint included) is complete at once.
        for gi, group in enumerate(self.param_groups):
            hyper = Hyper.of(group)
            keys = {(p.device, _real_dtype(p)) for p in group["params"] if p in self.state}
            for device, dtype in keys:
                self._flat_state(Bucket(gi, hyper, device, dtype, []))

    def _check_saved_states(self, state_dict: dict[str, Any]) -> None:
        """Shapes and keys of a checkpoint's states against this optimizer's params."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}")
        params = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {gi} of the state dict has {len(saved['params'])} params, "
                                 f"this optimizer's {len(group['params'])}")
            params.update(zip(saved["params"], group["params"]))
        for pid, st in state_dict["state"].items():
            p = params.get(pid)
            if p is None or not st:
                continue
            missing = {"step", "exp_avg", "exp_avg_sq"} - set(st)
            if missing:
                raise ValueError(f"the state of param {pid} lacks {', '.join(sorted(missing))} "
                                 f"(needs step, exp_avg, exp_avg_sq; exp_grad_var optional)")
            for key in STATE_KEYS:
                if key in st and as_real(st[key]).shape != as_real(p).shape and st[key].shape != p.shape:
                    raise ValueError(f"state {key!r} of param {pid} has shape {tuple(st[key].shape)}, "
                                     f"its param {tuple(p.shape)}")

    def _param_ids(self) -> dict[Tensor, int]:
        """Each param's index across groups, as in state_dict()."""
        params = (p for group in self.param_groups for p in group["params"])
        return {p: i for i, p in enumerate(params)}

    def _flat_state(self, bucket: Bucket) -> FlatState:
        """The flat states of a bucket; (re)built, adopting every existing state, when the bucket
        gained a param, a param's states were re-packed elsewhere, or state_dtype changed."""
        key = (bucket.group_index, bucket.device, bucket.dtype)
        flat = self._flat.get(key)
        if flat is not None and flat.serves(bucket.params, self.state, bucket.hyper.state_dtype):
            return flat
        group = self.param_groups[bucket.group_index]
        chosen = set(bucket.params)
        members = [p for p in group["params"] if (p in chosen or p in self.state)
                   and (p.device, _real_dtype(p)) == (bucket.device, bucket.dtype)]
        ids = self._param_ids()
        flat = FlatState(members, [ids[p] for p in members], self.state, bucket.hyper, bucket.device,
                         bucket.dtype)
        self._flat[key] = flat
        for other_key, other in list(self._flat.items()):  # drop buckets that own no state any more
            if not any(self.state.get(p) is e for p, e in zip(other.params, other.entries)):
                del self._flat[other_key]
        return flat

    # ----------------------------------------------------------------- the step
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
        self._run(self._plan(), grad_scale, found_inf)
        return loss

    def _plan(self) -> list[Bucket]:
        """Validate every group and choose every bucket's backend; raises before anything changes."""
        plan = []
        for gi, group in enumerate(self.param_groups):
            where = f" (param group {gi})"
            hyper = self._hyper(group, where)
            buckets: dict[tuple, list[Tensor]] = {}
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                _check_grad(p, p.grad, f" (param {i} of param group {gi})")
                buckets.setdefault((p.device, _real_dtype(p)), []).append(p)
            for (device, dtype), params in buckets.items():
                _, module = self._choose(group["backend"], device, dtype, hyper, where)
                plan.append(Bucket(gi, hyper, device, dtype, params, module))
        return plan

    def _run(self, plan: list[Bucket], grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        self._last["stats"], self._last["found_inf"] = [], found_inf
        for bucket in plan:
            flat = self._flat_state(bucket)
            sums = bucket.backend.step(flat, bucket.params, [p.grad for p in bucket.params], bucket.hyper,
                                       grad_scale=grad_scale, found_inf=found_inf)
            if sums is not None:  # kept on the device; read only by stats()
                numels = [flat.numels[flat.index[p]] for p in bucket.params]
                self._last["stats"].append((bucket.group_index, bucket.params, numels, sums))

    # ----------------------------------------------------------------- monitor
    def stats(self, per_param: bool = False) -> dict[str, Any]:
        """Gate statistics of the last step over all stepped elements (needs track_stats=True).

        mean_gate: mean of q; frac_above: fraction with m-hat^2 > alpha*s-hat;
        signal: sum of m-hat^2; noise: sum of alpha*s-hat; groups: the same per param group.
        With per_param=True: {param name: the same} for every param stepped, which needs named
        parameters (`SNRAdamW(model.named_parameters(), ...)`). Computed on the device in the
        step's pass; reading synchronizes with the device once, the step itself never does.
        """
        if not any(g["track_stats"] for g in self.param_groups):
            raise RuntimeError("stats() needs SNRAdamW(..., track_stats=True)")
        if per_param and self._last["stats"] and not all("param_names" in g for g in self.param_groups):
            raise ValueError("stats(per_param=True) needs named parameters: pass model.named_parameters() "
                             "(or groups of (name, param) pairs) to SNRAdamW")
        found_inf = self._last["found_inf"]
        skipped = found_inf is not None and found_inf.item() != 0
        rows: dict[int, list[Tensor]] = {}  # group -> [count, *STATS] per param
        names: dict[str, Tensor] = {}
        for gi, params, numels, sums in self._last["stats"]:
            counts = torch.tensor(numels, dtype=torch.float64)
            table = torch.cat([counts[:, None], sums.double().cpu()], 1)
            if skipped:
                table[:, 0] = 0  # the step was skipped: nothing was stepped
            rows.setdefault(gi, []).append(table)
            if per_param:
                group = self.param_groups[gi]
                index = {p: k for k, p in enumerate(group["params"])}
                for p, row in zip(params, table):
                    names[group["param_names"][index[p]]] = row
        groups = [torch.cat(rows[gi]).sum(0) if gi in rows else None for gi in range(len(self.param_groups))]
        present = [g for g in groups if g is not None]
        total = torch.stack(present).sum(0) if present else None
        out = {**_stats_dict(total), "groups": [_stats_dict(g) for g in groups]}
        if per_param:
            out["params"] = {name: _stats_dict(row) for name, row in names.items()}
        return out


def _check_grad(p: Tensor, g: Tensor, where: str) -> None:
    """The kernels read a grad as the param's dtype and layout: anything else is refused up front."""
    if g.is_sparse:
        raise RuntimeError(f"SNRAdamW does not support sparse gradients{where}; "
                           "use dense gradients (e.g. nn.Embedding(sparse=False))")
    if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        raise RuntimeError(f"grad does not match its param{where}: grad {g.dtype} {tuple(g.shape)} on "
                           f"{g.device}, param {p.dtype} {tuple(p.shape)} on {p.device}; they must agree")


def _unwrap(value: Any, device: torch.device | None) -> Any:
    if isinstance(value, _Exact):
        value = value.value
        if isinstance(value, Tensor) and device is not None:
            value = value.to(device=device)
    return value


def _stats_dict(sums: Tensor | None) -> dict[str, float]:
    """sums = (count, *contract.STATS)."""
    if sums is None or sums[0] == 0:
        return {k: float("nan") if k in ("mean_gate", "frac_above") else 0.0 for k in STAT_KEYS}
    count, *rest = (float(x) for x in sums)
    col = dict(zip(STATS, rest))
    return {"mean_gate": col["sum_q"] / count, "frac_above": col["count_above"] / count,
            "signal": col["sum_signal"], "noise": col["sum_noise"]}
