"""The accuracy cost of state_dtype=torch.bfloat16, measured against the float64 reference.

For each gate: relative error of the params' displacement (theta_t - theta_0) after n steps,
with float32 states and with bfloat16 states, against the reference that keeps its states
in float64 (snr_triton.check.displacement_error). Run: python bench/state_dtype_accuracy.py [backend]
"""

import sys

import torch

from snr_triton.check import Case, displacement_error
from snr_triton.contract import GATES


def main(backend: str = "auto") -> None:
    print(f"backend {backend}; params fp32, 1000 + 15 elements in two groups, lr 1e-2\n")
    print("| gate | steps | fp32 states | bf16 states |")
    print("|---|---|---|---|")
    for gate in GATES:
        for steps in (10, 100):
            e32, e16 = (displacement_error(Case(gate=gate, steps=steps, sizes=(1000,), state_dtype=d), backend)
                        for d in (torch.float32, torch.bfloat16))
            print(f"| {gate} | {steps} | {e32:.1e} | {e16:.1e} |")


if __name__ == "__main__":
    main(*sys.argv[1:2])
