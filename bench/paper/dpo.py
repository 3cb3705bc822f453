"""Paper claim: SNR gating improves DPO under noisy preferences and stays closer to the reference.

Litman & Guo fine-tune Qwen2.5-0.5B with DPO on preferences with flipped labels. Here, at a
scale a CPU can sweep, with nothing downloaded: a small LlamaForCausalLM (0.66M params, a
character tokenizer built in code) learns a+b= for a, b < 30, where a program knows the right
answer. It is first fine-tuned (SFT) on answers that are right 40% of the time and one too high
60% of the time, so its greedy answers start wrong; DPO (TRL's DPOTrainer, as a user would run
it) then gets pairs chosen = the right answer, rejected = a wrong one (one too high for 60% of
pairs, else off by -2, -1, +2 or +3), with 0%, 20% or 40% of the labels flipped.

Both optimizers get the same lr grid, seeds, beta, data order, steps and schedule (linear decay
after 10% warmup, no weight decay); SNRAdamW with alpha = b/(n-b). Measured on 200 held-out
prompts that DPO never saw: greedy accuracy, preference accuracy against the true labels (the
sign of the implicit reward margin), KL(pi || pi_ref) per token on the right completions (exact,
over the vocabulary), and SNRAdamW's gate statistics (SNRStatsCallback).

Run:  python bench/paper/dpo.py                      # the sweep (resumable: runs in --json are kept)
      python bench/paper/dpo.py --summary            # the tables from --json only
      python bench/paper/dpo.py --quick --json /tmp/dpo.json   # a few steps, one seed (a CI test)
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from snr_triton.claims import dpo_best, spread

RANGE = 30  # a, b in [0, RANGE)
HELD_OUT = 200  # prompts DPO never sees
TOKENS = list("0123456789+=") + ["<pad>", "<eos>", "<unk>"]
OPTIMIZERS = ("AdamW", "SNRAdamW")
DEFAULT_JSON = Path(__file__).parent / "results" / "dpo.json"


def tokenizer():
    """A character tokenizer for digits, '+' and '=', built here (nothing to download)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(TOKENS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[0-9+=]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def new_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(TOKENS), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
                         tie_word_embeddings=False, pad_token_id=TOKENS.index("<pad>"),
                         eos_token_id=TOKENS.index("<eos>"), bos_token_id=None)
    return LlamaForCausalLM(config)


def prompts() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All (a, b) pairs, split once (fixed seed) into DPO's training prompts and held-out ones."""
    pairs = [(a, b) for a in range(RANGE) for b in range(RANGE)]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(1234)).tolist()
    return [pairs[i] for i in order[HELD_OUT:]], [pairs[i] for i in order[:HELD_OUT]]


def wrong_answer(a: int, b: int, gen: torch.Generator) -> int:
    """The SFT policy's typical mistake (one too high) 60% of the time, else off by -2, -1, +2, +3."""
    if torch.rand((), generator=gen) < 0.6:
        return a + b + 1
    d = (-2, -1, 2, 3)[int(torch.randint(0, 4, (), generator=gen))]
    return a + b + d if a + b + d >= 0 else a + b + 1


def encode(tok, prompt: str, completion: str) -> list[int]:
    return tok(prompt + completion + tok.eos_token, add_special_tokens=False)["input_ids"]


def padded(tok, rows: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, completion) rows as right-padded token ids and a mask of the completion tokens
    (their eos included)."""
    ids = [encode(tok, p, c) for p, c in rows]
    starts = [len(tok(p, add_special_tokens=False)["input_ids"]) for p, _ in rows]
    x = torch.full((len(ids), max(map(len, ids))), tok.pad_token_id)
    mask = torch.zeros(x.shape, dtype=torch.bool)
    for i, (row, s) in enumerate(zip(ids, starts)):
        x[i, :len(row)] = torch.tensor(row)
        mask[i, s:len(row)] = True
    return x, mask


def completion_logprobs(model, tok, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-softmax over the vocabulary before each token, the tokens and the completion mask."""
    x, mask = padded(tok, rows)
    logp = torch.log_softmax(model(input_ids=x).logits.double(), -1)[:, :-1]
    return logp, x[:, 1:], mask[:, 1:]


@torch.no_grad()
def sequence_logprob(model, tok, rows) -> torch.Tensor:
    logp, targets, mask = completion_logprobs(model, tok, rows)
    return (logp.gather(-1, targets[..., None])[..., 0] * mask).sum(1)


@torch.no_grad()
def kl_per_token(model, ref, tok, rows) -> float:
    """KL(pi || pi_ref) summed over the vocabulary at each completion position, averaged over tokens."""
    lp, _, mask = completion_logprobs(model, tok, rows)
    lq, _, _ = completion_logprobs(ref, tok, rows)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return float(kl[mask].mean())


def preference_accuracy(model, ref, tok, pairs, beta: float) -> float:
    """Share of (prompt, better, worse) whose implicit reward margin
    beta*[(log pi - log pi_ref)(better) - (log pi - log pi_ref)(worse)] is positive."""
    better = [(p, c) for p, c, _ in pairs]
    worse = [(p, r) for p, _, r in pairs]
    margin = beta * ((sequence_logprob(model, tok, better) - sequence_logprob(ref, tok, better))
                     - (sequence_logprob(model, tok, worse) - sequence_logprob(ref, tok, worse)))
    return float((margin > 0).double().mean())


def greedy_accuracy(model, tok, held_out: list[tuple[int, int]], max_new: int = 4) -> float:
    """Share of prompts whose greedy answer is exactly a+b then eos (prompts differ in length, so
    each is decoded on its own: no padding for a pad mask to get wrong)."""
    right = 0
    with torch.no_grad():
        for a, b in held_out:
            x = torch.tensor([tok(f"{a}+{b}=", add_special_tokens=False)["input_ids"]])
            out = []
            for _ in range(max_new):
                nxt = int(model(input_ids=x).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]])], 1)
            right += tok.decode(out).replace(" ", "") == str(a + b) and nxt == tok.eos_token_id
    return right / len(held_out)


def sft_policy(tok, work: Path, steps: int, seed: int = 0):
    """The SFT model every DPO run starts from (and its reference): cached in `work`."""
    path = work / f"sft_{steps}_{seed}.pt"
    model = new_model(seed)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    train, held = prompts()
    everything = train + held
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        idx = torch.randint(0, len(everything), (128,), generator=gen).tolist()
        rows = []
        for i in idx:
            a, b = everything[i]
            answer = a + b if torch.rand((), generator=gen) < 0.4 else a + b + 1
            rows.append((f"{a}+{b}=", str(answer)))
        logp, targets, mask = completion_logprobs(model, tok, rows)
        loss = -(logp.gather(-1, targets[..., None])[..., 0] * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    work.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def preference_pairs(pairs: list[tuple[int, int]], per_prompt: int, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, right, wrong) per prompt, `per_prompt` wrong answers each."""
    gen = torch.Generator().manual_seed(seed)
    return [(f"{a}+{b}=", str(a + b), str(wrong_answer(a, b, gen))) for a, b in pairs for _ in range(per_prompt)]


def flip(pairs, noise: float, seed: int):
    """The DPO data: `noise` of the pairs (exactly round(noise*n), chosen by seed) with chosen and rejected swapped."""
    n = len(pairs)
    swapped = set(torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed))[:round(noise * n)].tolist())
    return [{"prompt": p, "chosen": r, "rejected": c} if i in swapped else {"prompt": p, "chosen": c, "rejected": r}
            for i, (p, c, r) in enumerate(pairs)]


def dpo_run(optimizer: str, lr: float, noise: float, seed: int, *, steps: int, batch: int, beta: float,
            sft_steps: int, work: Path) -> dict:
    """One DPO run through TRL's DPOTrainer; the metrics on the held-out prompts."""
    from datasets import Dataset, disable_progress_bars
    from transformers import PrinterCallback, get_linear_schedule_with_warmup
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    from snr_triton import SNRAdamW
    from snr_triton.hyperparams import finite_alpha
    from snr_triton.integrations import param_groups
    from snr_triton.integrations.transformers import SNRStatsCallback

    disable_progress_bars()
    hf_logging.set_verbosity_error()
    tok = tokenizer()
    train, held = prompts()
    data = flip(preference_pairs(train, 2, seed), noise, seed)
    policy, ref = sft_policy(tok, work, sft_steps), sft_policy(tok, work, sft_steps)
    ref.requires_grad_(False)
    groups = param_groups(policy, 0.0)
    if optimizer == "SNRAdamW":
        opt = SNRAdamW(groups, lr=lr, alpha=finite_alpha(batch, len(data)))
        callbacks = [SNRStatsCallback()]
    else:
        opt = torch.optim.AdamW(groups, lr=lr)
        callbacks = []
    schedule = get_linear_schedule_with_warmup(opt, max(1, steps // 10), steps)
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
                         beta=beta, logging_steps=max(1, steps // 10), report_to="none", save_strategy="no",
                         seed=seed, data_seed=seed, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                         max_length=16)
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(data),
                             processing_class=tok, optimizers=(opt, schedule), callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # the logs stay in trainer.state.log_history
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    policy.eval()
    held_pairs = preference_pairs(held, 1, 99)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    gates = [h["snr/mean_gate"] for h in logs if "snr/mean_gate" in h]
    return {
        "optimizer": optimizer, "seed": seed, "noise": noise, "lr": lr, "steps": steps, "batch": batch, "beta": beta,
        "greedy_accuracy": greedy_accuracy(policy, tok, held),
        "preference_accuracy": preference_accuracy(policy, ref, tok, held_pairs, beta),
        "kl_per_token": kl_per_token(policy, ref, tok, [(p, c) for p, c, _ in held_pairs]),
        "train_loss": logs[-1]["loss"] if logs else None,
        "mean_gate": statistics.fmean(gates) if gates else None,
        "final_frac_above": logs[-1].get("snr/frac_above") if logs else None,
        "seconds": seconds,
    }


def summarize(records: list[dict]) -> str:
    """Markdown: mean ± sd per (noise, optimizer, lr), then each optimizer at its best lr per noise."""
    def ms(xs):
        xs = [x for x in xs if x is not None]
        return spread(xs, 3) if xs else "-"

    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["noise"], r["optimizer"], r["lr"]), []).append(r)
    lines = ["| noise | optimizer | lr | seeds | greedy accuracy | preference accuracy | KL per token | mean gate |",
             "|---|---|---|---|---|---|---|---|"]
    for (noise, opt, lr), rs in sorted(cells.items()):
        lines.append(f"| {noise:.0%} | {opt} | {lr:g} | {len(rs)} | {ms([r['greedy_accuracy'] for r in rs])} | "
                     f"{ms([r['preference_accuracy'] for r in rs])} | {ms([r['kl_per_token'] for r in rs])} | "
                     f"{ms([r['mean_gate'] for r in rs])} |")
    lines += ["", "Best lr of each optimizer per noise level (by mean greedy accuracy, among lrs run on every seed):",
              "", "| noise | optimizer | best lr | greedy accuracy | preference accuracy | KL per token |",
              "|---|---|---|---|---|---|"]
    for (noise, opt), (lr, rs) in sorted(dpo_best(records).items()):
        lines.append(f"| {noise:.0%} | {opt} | {lr:g} | {ms([r['greedy_accuracy'] for r in rs])} | "
                     f"{ms([r['preference_accuracy'] for r in rs])} | {ms([r['kl_per_token'] for r in rs])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    parser.add_argument("--steps", type=int, default=150, help="DPO steps per run")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--sft-steps", type=int, default=1500)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="every run, read at start and written after each")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "snr-triton-dpo",
                        help="where the SFT policy is cached")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="5 DPO steps, 30 SFT steps, one seed, lr, noise")
    parser.add_argument("--summary", action="store_true", help="print the tables of --json and stop")
    args = parser.parse_args(argv)
    if args.quick:
        args.lrs, args.seeds, args.noise, args.steps, args.sft_steps = [1e-3], [0], [0.2], 5, 30
    torch.set_num_threads(args.threads)
    records = json.loads(args.json.read_text())["runs"] if args.json.exists() else []
    if not args.summary:
        done = {(r["optimizer"], r["noise"], r["lr"], r["seed"], r["steps"]) for r in records}
        jobs = [j for j in itertools.product(args.noise, args.seeds, args.lrs, OPTIMIZERS)
                if (j[3], j[0], j[2], j[1], args.steps) not in done]
        print(f"{len(jobs)} runs to do ({len(records)} in {args.json})", flush=True)
        for noise, seed, lr, opt in jobs:
            r = dpo_run(opt, lr, noise, seed, steps=args.steps, batch=args.batch, beta=args.beta,
                        sft_steps=args.sft_steps, work=args.work)
            records.append(r)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"task": "dpo a+b", "sft_steps": args.sft_steps, "runs": records}, indent=1))
            print(f"{opt:8s} noise {noise:.0%} lr {lr:g} seed {seed}: greedy {r['greedy_accuracy']:.3f}, "
                  f"preference {r['preference_accuracy']:.3f}, KL {r['kl_per_token']:.4f}, "
                  f"{r['seconds']:.0f} s", flush=True)
    print(summarize(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
