"""The accuracy cost of state_dtype=torch.bfloat16 and torch.uint8 (8-bit states), measured against
the float64 reference.

For each gate: relative error of the params' displacement (theta_t - theta_0) after n steps,
with float32, bfloat16 and 8-bit states, against the reference that keeps its states
in float64 (snr_triton.check.displacement_error). Run: python bench/state_dtype_accuracy.py [backend]
"""

import sys

import torch

from snr_triton.check import Case, displacement_error
from snr_triton.contract import GATES


def main(backend: str = "auto") -> None:
    print(f"backend {backend}; params fp32, 1000 + 15 elements in two groups, lr 1e-2\n")
    print("| gate | steps | fp32 states | bf16 states | 8-bit states |")
    print("|---|---|---|---|---|")
    for gate in GATES:
        for steps in (10, 100):
            errors = (displacement_error(Case(gate=gate, steps=steps, sizes=(1000,), state_dtype=d), backend)
                      for d in (torch.float32, torch.bfloat16, torch.uint8))
            print(f"| {gate} | {steps} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:2])
