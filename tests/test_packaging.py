"""The wheel ships the Triton source as snr_triton.kernels, never as a top-level `kernels`, and
the studies' results as snr_triton.results (what the demo's claims are read from)."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import installed_distribution


def installed_files():
    dist = installed_distribution()
    files = [str(f) for f in dist.files or []]
    if str(getattr(dist, "_path", "")).endswith(".egg-info") or any("__editable__" in f for f in files):
        pytest.skip("a development (editable) install: the wheel's layout is checked in CI")
    return files


def test_kernels_ship_inside_the_package():
    files = installed_files()
    assert "snr_triton/kernels/snr_adamw.py" in files
    assert not any(f.startswith("kernels/") for f in files)


def test_study_results_ship_inside_the_package():
    files = installed_files()
    assert {"snr_triton/results/grokking_transformer.json", "snr_triton/results/inr_control.json",
            "snr_triton/results/dpo.json"} <= set(files)
    assert not any(f.startswith(("bench/", "results/")) for f in files)


def test_console_script():
    installed_distribution()
    out = subprocess.run([sys.executable, "-m", "snr_triton.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "check" in out.stdout
    eps = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "snr-triton" and ep.value == "snr_triton.cli:main" for ep in eps)


def test_the_checkout_does_not_shadow_an_installed_kernels_package():
    """`python -m pytest`, or any script run from the repository root, puts the root first on
    sys.path. With a kernels/__init__.py there, `import kernels` found our source folder instead of
    the Hub's `kernels` package (which transformers imports when it is installed), and
    tests/test_integrations.py failed under `python -m pytest`. The folder ships as
    snr_triton.kernels and is loaded by path, so it needs no __init__.py."""
    root = Path(__file__).resolve().parent.parent
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')"
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True)
    assert not out.stdout.strip().startswith(str(root / "kernels")), out.stdout
