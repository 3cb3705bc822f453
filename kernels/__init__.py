"""Kernels: snr_adamw.py (Triton, GPU or interpreter) and snr_adamw_cpu.c (the fused CPU step)."""
