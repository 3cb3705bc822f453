"""The accuracy cost of state_dtype=torch.bfloat16, measured against the float64 reference.

For each gate: relative error of the params' displacement (theta_t - theta_0) after n steps,
with float32 states and with bfloat16 states, against the reference that keeps its states
in float64. Run: python bench/state_dtype_accuracy.py [backend]
"""

import sys

import torch

from snr_triton import SNRAdamW, reference
from snr_triton.check import Case, hyper, make_problem, relative_error


def displacement_error(gate: str, steps: int, state_dtype: torch.dtype, backend: str) -> float:
    case = Case(gate=gate, steps=steps, sizes=(1000,))
    params, grads = make_problem(case)
    g0, g1 = hyper(case)
    ours = [p.clone() for p in params]
    opt = SNRAdamW([{"params": ours[:-1], **g0}, {"params": ours[-1:], **g1}], backend=backend,
                   state_dtype=state_dtype)
    refs = [p.clone() for p in params]
    states = [reference.new_state(p) for p in refs]
    for gs in grads:
        for p, g in zip(ours, gs):
            p.grad = g.clone()
        opt.step()
        for i, (p, g) in enumerate(zip(refs, gs)):
            reference.reference_step(p, g, states[i], **(g0 if i < len(refs) - 1 else g1))
    return max(relative_error(p - p0, r - p0) for p, r, p0 in zip(ours, refs, params))


def main(backend: str = "auto") -> None:
    print(f"backend {backend}; params fp32, 1000 + 15 elements in two groups, lr 1e-2\n")
    print("| gate | steps | fp32 states | bf16 states |")
    print("|---|---|---|---|")
    for gate in ("snr", "soft", "hard", "none"):
        for steps in (10, 100):
            e32, e16 = (displacement_error(gate, steps, d, backend) for d in (torch.float32, torch.bfloat16))
            print(f"| {gate} | {steps} | {e32:.1e} | {e16:.1e} |")


if __name__ == "__main__":
    main(*sys.argv[1:2])
