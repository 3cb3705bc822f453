"""The noisy-image task: an implicit neural representation fitted to noisy pixels.

A Fourier-feature MLP maps (x, y) to intensity and is trained on the *noisy* image in
minibatches; PSNR against the *clean* image rises while it learns the picture and falls once it
starts memorizing the noise. The paper reports that the SNR gate memorizes less; at the same lr
our runs agree, and bench/paper/inr.py --control asks how much of that a smaller lr explains
(bench/RESULTS.md). Used by `snr-triton demo` and bench/paper/inr.py: the same data, init and
batches for every run.
"""

from __future__ import annotations

import math
import time

import torch

from .hyperparams import finite_alpha
from .optimizer import SNRAdamW


def photo(size: int = 64) -> torch.Tensor:
    """Grace Hopper's portrait, which ships with matplotlib: grayscale in [0, 1], size x size."""
    import matplotlib.cbook as cbook
    import matplotlib.image as mpimg

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        rgb = torch.from_numpy(mpimg.imread(f, format="jpg").copy()).float() / 255.0
    gray = (rgb @ torch.tensor([0.299, 0.587, 0.114]))[44:556]  # the 512 x 512 middle of 600 x 512
    return torch.nn.functional.interpolate(gray[None, None], size=(size, size), mode="area")[0, 0]


def synthetic_image(n: int = 64) -> torch.Tensor:
    """A smooth test picture (no file needed)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    img = 0.5 + 0.25 * torch.sin(3 * x) * torch.cos(2 * y) + 0.2 * ((x**2 + y**2) < 0.3).float() + 0.1 * x
    return img.clamp(0, 1)


class FourierMLP(torch.nn.Module):
    def __init__(self, features: int = 64, hidden: int = 256, scale: float = 6.0, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("B", torch.randn(2, features, generator=gen) * scale)
        self.net = torch.nn.Sequential(torch.nn.Linear(2 * features, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        z = xy @ self.B
        return self.net(torch.cat([torch.sin(z), torch.cos(z)], -1)).squeeze(-1)


def psnr(pred: torch.Tensor, clean: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / torch.mean((pred.clamp(0, 1) - clean) ** 2).item())


def train_side_by_side(clean: torch.Tensor, *, steps: int = 3000, lr: float = 1e-3, batch: int = 512,
                       noise: float = 0.1, seed: int = 0, eval_every: int = 100, gate: str = "snr",
                       progress: bool = True) -> dict:
    """AdamW and SNRAdamW (alpha = b/(n-b): many epochs over n pixels) fitted to the same noisy
    pixels with the same init and batches. Returns PSNR curves and the final reconstructions."""
    return fit(clean, {"AdamW": ("AdamW", lr), "SNRAdamW": ("SNRAdamW", lr)}, steps=steps, batch=batch, noise=noise,
               seed=seed, eval_every=eval_every, gate=gate, progress=progress)


def fit(clean: torch.Tensor, runs: dict[str, tuple], *, steps: int = 3000, batch: int = 512,
        noise: float = 0.1, seed: int = 0, eval_every: int = 100, gate: str = "snr", progress: bool = True) -> dict:
    """Fit one FourierMLP per run ({label: ("AdamW" | "SNRAdamW", lr[, SNRAdamW keyword args])})
    to the same noisy pixels, from the same init and on the same batches, so runs differ only in
    optimizer, lr and options (the lr-matched control of bench/paper/inr.py needs AdamW at several
    lrs beside SNRAdamW; bench/state_dtype_training.py SNRAdamW with several state dtypes)."""
    from tqdm import tqdm

    n = clean.numel()
    side = clean.shape[-1]
    flat = clean.flatten()
    noisy = flat + noise * torch.randn(flat.shape, generator=torch.Generator().manual_seed(100 + seed))
    y, x = torch.meshgrid(torch.linspace(-1, 1, clean.shape[0]), torch.linspace(-1, 1, side), indexing="ij")
    xy = torch.stack([x.flatten(), y.flatten()], 1)
    models, opts = {}, {}
    for name, (kind, lr, *options) in runs.items():
        torch.manual_seed(seed)
        models[name] = FourierMLP(seed=seed)
        if kind == "AdamW":
            opts[name] = torch.optim.AdamW(models[name].parameters(), lr=lr, weight_decay=0.0)
        elif kind == "SNRAdamW":
            opts[name] = SNRAdamW(models[name].parameters(), lr=lr, weight_decay=0.0, gate=gate,
                                  alpha=finite_alpha(batch, n), track_stats=True, **(options[0] if options else {}))
        else:
            raise ValueError(f"runs: the optimizer must be 'AdamW' or 'SNRAdamW', got {kind!r} for {name!r}")
    curves = {name: {"steps": [], "psnr_clean": [], "psnr_noisy": [], "gate": []} for name in models}
    gen = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    with tqdm(total=steps, desc="fitting the noisy image", unit="step", disable=not progress) as bar:
        for step in range(1, steps + 1):
            idx = torch.randint(0, n, (batch,), generator=gen)
            for name, model in models.items():
                loss = torch.mean((model(xy[idx]) - noisy[idx]) ** 2)
                opts[name].zero_grad()
                loss.backward()
                opts[name].step()
            bar.update(1)
            if step % eval_every == 0 or step == steps:
                with torch.no_grad():
                    for name, model in models.items():
                        pred = model(xy)
                        c = curves[name]
                        c["steps"].append(step)
                        c["psnr_clean"].append(psnr(pred, flat))
                        c["psnr_noisy"].append(psnr(pred, noisy))
                        if isinstance(opts[name], SNRAdamW):
                            st = opts[name].stats()
                            c["gate"].append((st["mean_gate"], st["frac_above"]))
                bar.set_postfix({k: f"{curves[k]['psnr_clean'][-1]:.1f} dB" for k in models})
    with torch.no_grad():
        images = {name: model(xy).clamp(0, 1).reshape(clean.shape).tolist() for name, model in models.items()}
    return {
        "config": dict(steps=steps, runs={k: [str(x) if isinstance(x, dict) else x for x in v] for k, v in runs.items()}, lr=next(iter(runs.values()))[1],
                       batch=batch, noise=noise, seed=seed, gate=gate, alpha=finite_alpha(batch, n), pixels=n,
                       model="FourierMLP(features=64, hidden=256, scale=6)"),
        "seconds": time.perf_counter() - start,
        "noisy_psnr": psnr(noisy, flat),
        "curves": curves,
        "final": {name: c["psnr_clean"][-1] for name, c in curves.items()},
        "peak": {name: max(c["psnr_clean"]) for name, c in curves.items()},
        "images": {"clean": clean.tolist(), "noisy": noisy.clamp(0, 1).reshape(clean.shape).tolist(), **images},
    }
