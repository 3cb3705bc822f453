"""snr_triton.claims: what the demo tells users is computed from the studies' result files
(checked here on hand-made files whose summaries are worked out by hand), and those files ship
in the package."""

import pytest

from conftest import installed_distribution
from snr_triton import claims


def grok(optimizer, lr, seed, to_95, cap=10000, gate="snr", alpha=0.3):
    return {"optimizer": optimizer, "model": "transformer", "lr": lr, "seed": seed, "to_95": to_95, "cap": cap,
            "diverged": False, "gate": None if optimizer == "AdamW" else gate, "alpha": alpha}


def use(monkeypatch, files):
    monkeypatch.setattr(claims, "load", lambda name: files.get(name))


def test_grokking_summary_from_a_hand_made_file(monkeypatch):
    runs = [grok("AdamW", 0.01, s, t) for s, t in enumerate((1000, 2000, 3000))]
    runs += [grok("AdamW", 0.001, s, None) for s in range(3)]
    runs += [grok("SNRAdamW", 0.001, s, 4000) for s in range(3)]
    runs += [grok("SNRAdamW", 0.01, s, None) for s in range(3)]
    runs += [grok("SNRAdamW", 0.01, 0, 10, alpha=1.0)]  # another SNRAdamW setting: not this claim
    runs += [grok("AdamW", 0.03, s, None, cap=5000) for s in range(3)]  # a smaller cap, not stopped: left out
    control = {"control": "lr-matched", "matched_to": 0.001}
    runs += [{**grok("SNRAdamW", 0.001, 0, 5000), **control, "mean_gate": 0.1},  # the control: not the sweep's
             {**grok("AdamW", 0.0001, 0, None), **control}]
    use(monkeypatch, {"grokking_transformer.json": runs})
    text = claims.grokking()
    assert "lrs 0.001 / 0.01 (3 seeds, cap 10,000 steps)" in text
    assert "AdamW needs 2,000 ± 1,000 steps to 95% held out (lr 0.01)" in text
    assert "SNRAdamW 4,000 ± 0 (lr 0.001)" in text
    assert "SNRAdamW is slower, 0.50 ± 0.25x AdamW's speed per seed" in text  # 1000/4000, 2000/4000, 3000/4000
    assert "0.001: none of 3 in 10,000 / 4,000 ± 0; 0.01: 2,000 ± 1,000 / none of 3 in 10,000." in text
    assert text.endswith("per seed, SNRAdamW / AdamW steps to 95%: seed 0, gate 0.10: 5,000 / not in 10,000")


def inr_run(run, optimizer, lr, seed, final, peak, gate=None):
    return {"run": run, "optimizer": optimizer, "lr": lr, "seed": seed, "final_psnr": final, "peak_psnr": peak,
            "mean_gate": gate}


@pytest.mark.parametrize("matched_final, verdict", [(23.0, "explained by SNRAdamW's smaller steps"),
                                                    (21.0, "more than SNRAdamW's smaller steps")])
def test_inr_verdict_follows_the_lr_matched_control(monkeypatch, matched_final, verdict):
    runs = []
    for seed in range(2):
        runs += [inr_run("SNRAdamW", "SNRAdamW", 1e-3, seed, 22.0 + seed, 23.5, gate=0.1 + 0.1 * seed),
                 inr_run("AdamW", "AdamW", 1e-3, seed, 21.0, 23.0),
                 inr_run("AdamW, lr 0.0001", "AdamW", 1e-4, seed, 23.2, 23.3),
                 inr_run("AdamW, lr-matched", "AdamW", 1.5e-4, seed, matched_final, 23.1)]
    runs.append(inr_run("SNRAdamW, lr 0.0001", "SNRAdamW", 1e-4, 0, 30.0, 30.0, gate=0.9))  # one seed: cannot win
    use(monkeypatch, {"inr_control.json": {"lr": 1e-3, "runs": runs}})
    text = claims.inr()
    assert "SNRAdamW ends at 22.50 ± 0.71 dB and AdamW at 21.00 ± 0.00 dB" in text
    assert "mean gate is 0.15" in text and verdict in text
    assert ("final AdamW 23.20 ± 0.00 dB (lr 0.0001), SNRAdamW 22.50 ± 0.71 dB (lr 0.001), per seed -1.20, "
            "-0.20 dB") in text
    assert ("peak (stopping early) AdamW 23.30 ± 0.00 dB (lr 0.0001), SNRAdamW 23.50 ± 0.00 dB (lr 0.001), "
            "per seed +0.20, +0.20 dB") in text


def test_dpo_summary_takes_each_optimizers_best_lr_per_noise(monkeypatch):
    def run(opt, noise, lr, seed, acc, kl):
        return {"optimizer": opt, "noise": noise, "lr": lr, "seed": seed, "greedy_accuracy": acc, "kl_per_token": kl}
    runs = [run("AdamW", 0.2, 1e-3, s, 0.5 + 0.1 * s, 1.0) for s in range(2)]
    runs += [run("AdamW", 0.2, 1e-4, s, 0.3, 0.2) for s in range(2)]
    runs += [run("SNRAdamW", 0.2, 1e-3, s, 0.4, 0.5) for s in range(2)]
    runs += [run("SNRAdamW", 0.2, 3e-3, 0, 0.9, 0.5)]  # one seed: cannot win
    use(monkeypatch, {"dpo.json": {"runs": runs}})
    assert claims.dpo() == ("greedy answers right on held-out prompts and KL(pi || pi_ref) per token, 2 seeds, each "
                            "optimizer at its best lr: 20% flipped: AdamW 55.0 ± 7.1% right, KL 1.00 ± 0.00 "
                            "(lr 0.001), SNRAdamW 40.0 ± 0.0% right, KL 0.50 ± 0.00 (lr 0.001)")


def test_missing_files_give_no_claim(monkeypatch):
    use(monkeypatch, {})
    assert claims.grokking() is None and claims.inr() is None and claims.dpo() is None


def test_the_studies_results_ship_in_the_package():
    """Installed (not only editable) the package carries bench/paper/results as snr_triton.results."""
    installed_distribution()
    assert isinstance(claims.load("grokking_transformer.json"), list)
    assert claims.load("inr_control.json")["runs"] and claims.load("dpo.json")["runs"]
    assert "AdamW needs" in claims.grokking() and "lr-matched control" in claims.inr() and "flipped" in claims.dpo()
