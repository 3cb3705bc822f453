"""What only the eager backend has: bounded temporaries for large tensors."""

from snr_triton.check import Case, passes, run_case

from conftest import DEVICE


def test_eager_steps_large_tensors_in_bounded_pieces(monkeypatch):
    """Eager splits big tensors into pieces and batches (bounded temporaries): same results."""
    from snr_triton.backend import eager

    monkeypatch.setattr(eager, "PIECE", 64)
    monkeypatch.setattr(eager, "BATCH", 256)
    for gate in ("snr", "hard"):
        case = Case(gate=gate, sizes=(1000, 7, 300, 0), steps=4)
        err = run_case(case, "eager", DEVICE)
        assert passes(case, err), err
