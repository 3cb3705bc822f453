"""bench/paper/dpo.py: DPO through TRL's DPOTrainer with both optimizers, its metrics checked
against closed-form cases, and its --quick run end to end (the `paper` extra)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

SCRIPT = Path(__file__).parents[1] / "bench" / "paper" / "dpo.py"
spec = importlib.util.spec_from_file_location("dpo_study", SCRIPT)
dpo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dpo)


class Oracle(torch.nn.Module):
    """A 'language model' that reads a+b= from its input and puts all mass on the answer's next
    character (plus `offset`), then eos: the truth that greedy_accuracy must score 1 (offset 0)."""

    def __init__(self, tok, offset=0):
        super().__init__()
        self.tok, self.offset = tok, offset

    def forward(self, input_ids):
        text = self.tok.decode(input_ids[0].tolist()).replace(" ", "")
        prompt, done = text.split("=")
        a, b = map(int, prompt.split("+"))
        answer = str(a + b + self.offset) + "<eos>"
        nxt = answer[len(done)] if len(done) < len(str(a + b + self.offset)) else "<eos>"
        logits = torch.full((1, input_ids.shape[1], len(dpo.TOKENS)), -1e4)
        logits[0, -1, dpo.TOKENS.index(nxt)] = 0.0
        return type("Out", (), {"logits": logits})()


def test_greedy_accuracy_scores_an_oracle_one_and_an_off_by_one_oracle_zero():
    tok = dpo.tokenizer()
    _, held = dpo.prompts()
    assert dpo.greedy_accuracy(Oracle(tok), tok, held[:40]) == 1.0
    assert dpo.greedy_accuracy(Oracle(tok, offset=1), tok, held[:40]) == 0.0


def test_prompts_split_all_pairs_and_flip_swaps_exactly_the_noise_share():
    train, held = dpo.prompts()
    assert len(held) == dpo.HELD_OUT and not set(train) & set(held)
    assert len(set(train) | set(held)) == dpo.RANGE ** 2
    pairs = dpo.preference_pairs(train, 2, seed=0)
    assert all(c == str(eval(p[:-1])) and r != c for p, c, r in pairs)  # chosen is right, rejected is not
    data = dpo.flip(pairs, 0.4, seed=3)
    swapped = sum(d["chosen"] != c for d, (_, c, _) in zip(data, pairs))
    assert swapped == round(0.4 * len(pairs))
    assert data == dpo.flip(pairs, 0.4, seed=3) and data != dpo.flip(pairs, 0.4, seed=4)


def test_metrics_of_a_policy_against_itself_and_against_a_shifted_policy():
    tok = dpo.tokenizer()
    model = dpo.new_model(0).eval()
    _, held = dpo.prompts()
    pairs = dpo.preference_pairs(held[:30], 1, seed=0)
    rows = [(p, c) for p, c, _ in pairs]
    assert dpo.kl_per_token(model, model, tok, rows) == 0.0
    assert dpo.preference_accuracy(model, model, tok, pairs, 0.1) == 0.0  # every margin exactly 0
    # a policy whose log-probs differ from the reference by a known amount: the closed-form KL
    other = dpo.new_model(1).eval()
    lp, _, mask = dpo.completion_logprobs(model, tok, rows)
    lq, _, _ = dpo.completion_logprobs(other, tok, rows)
    expected = sum((lp.exp()[i, j] * (lp[i, j] - lq[i, j])).sum() for i, j in mask.nonzero().tolist()) / mask.sum()
    assert dpo.kl_per_token(model, other, tok, rows) == pytest.approx(float(expected), rel=1e-9)


def test_our_tokens_are_trls_tokens(tmp_path):
    """The metrics score exactly the sequences DPOTrainer trains on."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = dpo.tokenizer()
    data = [{"prompt": "12+7=", "chosen": "19", "rejected": "20"}, {"prompt": "3+4=", "chosen": "7", "rejected": "8"}]
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1, max_length=16)
    trainer = DPOTrainer(model=dpo.new_model(0), ref_model=dpo.new_model(0), args=args,
                         train_dataset=Dataset.from_list(data), processing_class=tok)
    for row, d in zip(trainer.train_dataset, data):
        assert row["prompt_ids"] + row["chosen_ids"] == dpo.encode(tok, d["prompt"], d["chosen"])
        assert row["prompt_ids"] + row["rejected_ids"] == dpo.encode(tok, d["prompt"], d["rejected"])


def test_quick_study_runs_both_optimizers_through_dpo_trainer_and_resumes(tmp_path, capsys):
    out = tmp_path / "dpo.json"
    assert dpo.main(["--quick", "--json", str(out), "--work", str(tmp_path / "work")]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert {r["optimizer"] for r in runs} == {"AdamW", "SNRAdamW"}
    for r in runs:
        assert {"optimizer", "seed", "noise", "lr"} <= set(r) and r["noise"] == 0.2 and r["steps"] == 5
        assert 0 <= r["greedy_accuracy"] <= 1 and 0 <= r["preference_accuracy"] <= 1 and r["kl_per_token"] > 0
    snr = next(r for r in runs if r["optimizer"] == "SNRAdamW")
    assert 0 < snr["mean_gate"] <= 1  # logged by SNRStatsCallback inside DPOTrainer
    assert "2 runs to do" in capsys.readouterr().out
    assert dpo.main(["--quick", "--json", str(out), "--work", str(tmp_path / "work")]) == 0
    assert "0 runs to do (2 in" in capsys.readouterr().out  # resumed: nothing run twice
    assert json.loads(out.read_text())["runs"] == runs
