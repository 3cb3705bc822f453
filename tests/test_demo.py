"""The demo tasks (noisy-photo INR, grokking) and `snr-triton demo --quick` end to end."""

import json

import pytest
import torch

from snr_triton import claims
from snr_triton.cli import main
from snr_triton.grokking import division_dataset, modular_inverse


@pytest.mark.parametrize("p", [5, 97])
def test_modular_inverse(p):
    for b in range(1, p):
        assert b * modular_inverse(b, p) % p == 1
    with pytest.raises(ValueError):
        modular_inverse(0, p)


def test_division_dataset():
    (xt, yt), (xv, yv) = division_dataset(97, 0.25, seed=3)
    assert len(xt) + len(xv) == 97 * 96 and len(xt) == round(0.25 * 97 * 96)
    for x, y in ((xt, yt), (xv, yv)):
        a, b = x[:, 0], x[:, 1]
        assert torch.all(b > 0) and torch.all((y * b - a) % 97 == 0)  # y = a / b mod 97
    pairs = {tuple(r) for r in xt.tolist()} | {tuple(r) for r in xv.tolist()}
    assert len(pairs) == 97 * 96  # disjoint and complete


def test_photo_ships_with_matplotlib():
    pytest.importorskip("matplotlib")
    from snr_triton.inr import photo

    img = photo(64)
    assert img.shape == (64, 64) and 0 <= img.min() < 0.2 and 0.8 < img.max() <= 1  # a real photo's range


def test_demo_inr_quick(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert result["config"]["steps"] == 300 and set(result["final"]) == {"AdamW", "SNRAdamW"}
    curves = result["curves"]
    assert curves["AdamW"]["steps"][-1] == 300 and len(curves["SNRAdamW"]["gate"]) == 6
    # both learn the photo: well above a constant-grey guess, and the noisy targets are ~20.8 dB
    assert all(c["psnr_clean"][-1] > 15 for c in curves.values())
    out = capsys.readouterr().out
    assert "paper: SNR gating memorizes less" in out and "measured here" in out
    assert claims.inr() in out  # the study's verdict, read from bench/paper/results/inr_control.json


def test_demo_grokking_quick(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    assert main(["demo", "grokking", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert result["steps_run"] == 300 and set(result["to_95"]) == {"AdamW", "SNRAdamW"}
    gate = result["curves"]["SNRAdamW"]["gate"]
    assert len(gate) == 6 and all(0 <= q <= 1 and 0 <= f <= 1 for q, f in gate)
    out = capsys.readouterr().out
    assert "steps to 50% held-out" in out and "paper: about 5x faster grokking" in out
    assert claims.grokking() in out  # read from bench/paper/results/grokking_transformer.json


def test_demo_grokking_transformer(tmp_path, capsys):
    """The paper's model runs through the same side-by-side loop (both optimizers from one init)."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    argv = ["demo", "grokking", "--model", "transformer", "--quick", "--steps", "100", "--no-progress",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["config"]["model"].startswith("GrokkingTransformer") and result["steps_run"] == 100
    curves = result["curves"]
    assert len(curves["SNRAdamW"]["gate"]) == 2 and curves["AdamW"]["steps"] == [50, 100]
    assert "GrokkingTransformer" in capsys.readouterr().out


def test_demo_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "(default: inr)" in out and "(default: snr-demo)" in out
