"""bench/mutants.py's hand-written mutants still apply: a refactor that moves the code a mutant
names would otherwise leave it "not planted" in the next mutation run, unnoticed until then."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_mutants", ROOT / "bench" / "mutants.py")
mutants = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = mutants  # dataclasses look their module up there
_spec.loader.exec_module(mutants)


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_each_mutant_finds_its_code_once_and_changes_it(mutant):
    source = (ROOT / mutant.path).read_text()
    assert source.count(mutant.original) == 1, f"{mutant.path} no longer holds this mutant's code once"
    assert mutant.mutated != mutant.original
    for test in mutant.tests:
        assert (ROOT / test.split("::")[0]).exists(), test
