"""snr-triton: SNR-gated AdamW (Litman & Guo 2026) as fused Triton kernels."""

from .hyperparams import finite_alpha
from .optimizer import SNRAdamW

__all__ = ["SNRAdamW", "finite_alpha"]
__version__ = "0.1.0"
