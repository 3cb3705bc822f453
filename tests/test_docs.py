"""The repository's ALGORITHM.md says what the code does: its defaults table is SNRAdamW's."""

import inspect
import re
from pathlib import Path

import pytest

from snr_triton import SNRAdamW

DOC = Path(__file__).resolve().parent.parent / "ALGORITHM.md"


def documented_defaults() -> dict[str, str]:
    text = DOC.read_text()
    section = text.split("## Hyperparameters and defaults", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, flags=re.M)
    return {name: value.strip() for name, value in rows}


RUNTIME = {"backend", "state_dtype", "stochastic_rounding", "track_stats"}


def test_defaults_table_matches_the_constructor():
    table = documented_defaults()
    signature = inspect.signature(SNRAdamW.__init__).parameters
    named = [n for n, p in signature.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][2:]  # self, params
    assert set(table) == set(named) - RUNTIME
    for name, text in table.items():
        expected = signature[name].default
        value = eval(text.strip('"'), {}) if text[0] != '"' else text.strip('"')
        assert value == expected, (name, text, expected)


def test_positional_order_is_adamws():
    """ALGORITHM.md: `params, lr, betas, eps, weight_decay` positionally, as torch.optim.AdamW; the rest
    keyword-only, so an AdamW call with positional arguments means the same here (or fails loudly)."""
    import torch

    ours = inspect.signature(SNRAdamW.__init__).parameters
    adamw = inspect.signature(torch.optim.AdamW.__init__).parameters
    positional = [n for n, p in ours.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == ["self", "params", "lr", "betas", "eps", "weight_decay"] == list(adamw)[:6]
    assert "Constructor order" in DOC.read_text() or "positionally" in DOC.read_text()


@pytest.mark.parametrize("name", ["backend", "state_dtype", "stochastic_rounding", "track_stats"])
def test_runtime_options_are_named(name):
    assert f"`{name}`" in DOC.read_text()
