"""The command line: bad arguments end in argparse's usage error (exit 2), sizes read and print
as people write them, and `check` names every backend it skips."""

import pytest

from snr_triton.benchmark import format_size, parse_size
from snr_triton.cli import backend_matrix, main


@pytest.mark.parametrize("argv", [["bench", "--sizes", "abc"], ["bench", "--sizes", "0"], ["bench", "--steps", "0"],
                                  ["demo", "--steps", "-3"], ["demo", "mnist"], ["codegen", "--arch", "x"],
                                  ["codegen", "--arch", "12"]])
def test_bad_arguments_exit_2_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: snr-triton" in capsys.readouterr().err


def test_sizes():
    assert [parse_size(s) for s in ("256K", "16M", "1G", "1048576", "1.5M")] == [1 << 18, 1 << 24, 1 << 30, 1 << 20,
                                                                                  3 << 19]
    assert [format_size(n) for n in (1 << 18, 1 << 24, 1 << 30, 3 << 19, 1000)] == ["256K", "16M", "1G", "1.5M",
                                                                                     "1000"]


def test_check_names_what_it_skips():
    cells, skipped = backend_matrix()
    assert ("eager", "fp64") in {(b, d) for b, _, d in cells}
    for name in ("triton", "cpu"):  # on a GPU machine Triton is checked on the GPU and skipped on the CPU
        if any(b == name and device == "cpu" for b, device, _ in cells):
            assert any(line.startswith(f"{name}:cpu skips") for line in skipped)
        else:
            assert any(line.startswith(f"{name}:cpu skipped: ") for line in skipped)
