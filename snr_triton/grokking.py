"""The grokking task of the paper: a * b^-1 mod p from a fraction of all pairs.

Used by `snr-triton demo` and bench/paper/grokking.py: the same data, model and training
loop for both optimizers, so the only difference between the runs is the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def modular_inverse(b: int, p: int) -> int:
    """b^-1 mod p for prime p (Fermat)."""
    if b % p == 0:
        raise ValueError(f"0 has no inverse mod {p}")
    return pow(b, p - 2, p)


def division_dataset(p: int = 97, train_fraction: float = 0.25, seed: int = 0):
    """All pairs (a, b), b != 0, labelled a * b^-1 mod p, split at random into train and held out."""
    a = torch.arange(p).repeat_interleave(p - 1)
    b = torch.arange(1, p).repeat(p)
    inv = torch.tensor([modular_inverse(int(x), p) for x in range(1, p)])
    y = (a * inv[b - 1]) % p
    perm = torch.randperm(len(a), generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_fraction * len(a)))
    x = torch.stack([a, b], 1)
    return (x[perm[:n_train]], y[perm[:n_train]]), (x[perm[n_train:]], y[perm[n_train:]])


class DivisionMLP(torch.nn.Module):
    """Embed a and b, concatenate, one hidden layer: small enough to grok on a CPU in minutes."""

    def __init__(self, p: int = 97, dim: int = 64, hidden: int = 256):
        super().__init__()
        self.embed = torch.nn.Embedding(p, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(2 * dim, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(x).flatten(1))


class GrokkingTransformer(torch.nn.Module):
    """The standard grokking model: a decoder-only transformer over the tokens [a, b, =]
    (2 layers, 4 heads), read out at '='."""

    def __init__(self, p: int = 97, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tokens = torch.nn.Embedding(p + 1, dim)  # p is the '=' token
        self.positions = torch.nn.Parameter(torch.randn(3, dim) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.out = torch.nn.Linear(dim, p)
        self.register_buffer("causal", torch.nn.Transformer.generate_square_subsequent_mask(3))
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eq = torch.full((x.shape[0], 1), self.p, dtype=x.dtype, device=x.device)
        h = self.tokens(torch.cat([x, eq], 1)) + self.positions
        h = self.blocks(h, mask=self.causal, is_causal=True)
        return self.out(self.norm(h[:, -1]))


MODELS = {"mlp": DivisionMLP, "transformer": GrokkingTransformer}
MODEL_NAMES = {"mlp": "DivisionMLP(dim=64, hidden=256)",
               "transformer": "GrokkingTransformer(dim=64, layers=2, heads=4)"}


def train_one(optimizer: str, *, model: str = "mlp", p: int = 97, train_fraction: float = 0.25,
              steps: int = 40000, lr: float = 3e-3, weight_decay: float = 1.0, batch_size: int = 512,
              seed: int = 0, eval_every: int = 100, gate: str = "snr", alpha: float | None = None) -> dict:
    """One optimizer ("AdamW" or "SNRAdamW") on the task; the same data, init and batches as any
    other run with this seed. Stops at 95% held-out accuracy, at `steps`, or when the loss is not
    finite (reported as diverged)."""
    from .hyperparams import finite_alpha
    from .optimizer import SNRAdamW

    (xt, yt), (xv, yv) = division_dataset(p, train_fraction, seed)
    torch.manual_seed(seed)
    net = MODELS[model](p)
    betas = (0.9, 0.98)
    if optimizer == "AdamW":
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
    else:
        alpha = finite_alpha(batch_size, len(xt)) if alpha is None else alpha
        opt = SNRAdamW(net.parameters(), lr=lr, weight_decay=weight_decay, betas=betas, gate=gate, alpha=alpha,
                       track_stats=True)
    gen = torch.Generator().manual_seed(seed + 1)
    curve = Curve([], [], [], [])
    diverged = False
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(xt), (batch_size,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
        if not torch.isfinite(loss):
            diverged = True
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0:
            curve.steps.append(step)
            curve.train_acc.append(accuracy(net, xt, yt))
            curve.test_acc.append(accuracy(net, xv, yv))
            if isinstance(opt, SNRAdamW):
                curve.gate.append(opt.stats()["mean_gate"])
            if curve.test_acc[-1] >= 0.95:
                break
    return {"optimizer": optimizer, "model": model, "lr": lr, "gate": gate if optimizer != "AdamW" else None,
            "alpha": alpha if optimizer != "AdamW" else None, "seed": seed, "diverged": diverged,
            "to_50": first_step_at(curve, 0.5), "to_95": first_step_at(curve, 0.95),
            "final_test_acc": curve.test_acc[-1] if curve.test_acc else None,
            "best_test_acc": max(curve.test_acc, default=None),
            "final_train_acc": curve.train_acc[-1] if curve.train_acc else None,
            # the mean gate over the evaluations: the lr-matched control's AdamW runs at lr times this
            "mean_gate": sum(curve.gate) / len(curve.gate) if curve.gate else None}


@dataclass
class Curve:
    steps: list
    train_acc: list
    test_acc: list
    gate: list  # (mean_gate, frac_above) per evaluation, SNRAdamW only


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def first_step_at(curve: Curve, threshold: float) -> int | None:
    for step, acc in zip(curve.steps, curve.test_acc):
        if acc >= threshold:
            return step
    return None


def train_side_by_side(*, p: int = 97, train_fraction: float = 0.25, steps: int = 40000,
                       lr: float = 3e-3, weight_decay: float = 1.0, batch_size: int = 512,
                       seed: int = 0, eval_every: int = 100, time_budget: float | None = None,
                       gate: str = "snr", alpha: float | None = None, progress: bool = True,
                       model: str = "mlp") -> dict:
    """AdamW and SNRAdamW on the same data, model init and batches, one step of each in turn.

    Stops when both reach 95% held-out accuracy, at `steps`, or after `time_budget` seconds.
    alpha defaults to the finite-data value b/(n-b). Returns curves and steps to 50%/95%.
    """
    import time

    from tqdm import tqdm

    from .hyperparams import finite_alpha
    from .optimizer import SNRAdamW

    (xt, yt), (xv, yv) = division_dataset(p, train_fraction, seed)
    alpha = finite_alpha(batch_size, len(xt)) if alpha is None else alpha
    torch.manual_seed(seed)
    init = MODELS[model](p)
    models = {"AdamW": init, "SNRAdamW": MODELS[model](p)}
    models["SNRAdamW"].load_state_dict(init.state_dict())
    betas = (0.9, 0.98)
    opts = {
        "AdamW": torch.optim.AdamW(models["AdamW"].parameters(), lr=lr, weight_decay=weight_decay, betas=betas),
        "SNRAdamW": SNRAdamW(models["SNRAdamW"].parameters(), lr=lr, weight_decay=weight_decay, betas=betas,
                             gate=gate, alpha=alpha, track_stats=True),
    }
    curves = {name: Curve([], [], [], []) for name in models}
    gen = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="grokking a/b mod %d" % p, disable=not progress, unit="step")
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(xt), (batch_size,), generator=gen)
        for name, net in models.items():
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
        bar.update(1)
        if step % eval_every == 0 or step == steps:
            for name, net in models.items():
                c = curves[name]
                c.steps.append(step)
                c.train_acc.append(accuracy(net, xt, yt))
                c.test_acc.append(accuracy(net, xv, yv))
                if name == "SNRAdamW":
                    st = opts[name].stats()
                    c.gate.append((st["mean_gate"], st["frac_above"]))
            bar.set_postfix({n: f"{curves[n].test_acc[-1]:.2f}" for n in models})
            done = all(first_step_at(c, 0.95) is not None for c in curves.values())
            if done or (time_budget is not None and time.perf_counter() - start > time_budget):
                break
    bar.close()
    result = {
        "config": dict(p=p, train_fraction=train_fraction, lr=lr, weight_decay=weight_decay,
                       batch_size=batch_size, seed=seed, gate=gate, alpha=alpha, betas=betas,
                       train_size=len(xt), model=MODEL_NAMES[model]),
        "seconds": time.perf_counter() - start,
        "steps_run": curves["AdamW"].steps[-1] if curves["AdamW"].steps else 0,
        "to_50": {n: first_step_at(c, 0.5) for n, c in curves.items()},
        "to_95": {n: first_step_at(c, 0.95) for n, c in curves.items()},
        "curves": {n: vars(c) for n, c in curves.items()},
    }
    return result
