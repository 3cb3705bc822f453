"""Run mutmut's mutants that mutmut itself cannot test: functions that run at import.

    python bench/mutmut_plant.py MUTMUT_DIR NAME_PATTERN [--tests T ...] [-k EXPR] [--every N] [--markdown OUT]

mutmut 3 picks the active mutant when a function is called, in a child forked after the tests
were collected; a function that ran at import (`fused_op.register`, which each backend calls
when its module loads, or `codebook`'s table builders) ran unmutated in the parent, so each of
its mutants "survives" untested. This script takes those mutants from a finished or stopped
`bash bench/mutmut.sh MUTMUT_DIR ...` run (`mutmut show NAME` gives each as a diff of lines),
plants each in the source of a copy of this working tree before anything imports it, runs the
tests on the copy (`-x`: the first failure kills it) and reports killed / survived / not planted
(a diff whose lines are not found once in the source). Not run in CI.
"""

from __future__ import annotations

import argparse
import fnmatch
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants import ROOT, Mutant, run  # noqa: E402  (the same copy-plant-test loop as the hand-written list)


def mutant_names(repo: Path, pattern: str, uncaught: bool = False) -> list[str]:
    """The mutants matching `pattern`; with `uncaught`, only those mutmut did not catch (killed,
    timed out, crashed), e.g. its survivors and its "no tests" of functions that ran at collection."""
    out = subprocess.run(["mutmut", "results", "--all", "true"], cwd=repo, capture_output=True, text=True).stdout
    rows = [[part.strip() for part in line.rsplit(":", 1)] for line in out.splitlines() if ":" in line]
    return [name for name, status in rows if fnmatch.fnmatch(name, pattern)
            and not (uncaught and status in ("killed", "timeout", "segfault"))]


def as_mutant(repo: Path, name: str, tests: tuple[str, ...]) -> Mutant | None:
    """One mutmut mutant as a planted one: its diff's hunk (context lines kept, so a line that
    occurs twice in the file is found in its own place)."""
    out = subprocess.run(["mutmut", "show", name], cwd=repo, capture_output=True, text=True).stdout
    path, hunk = None, []  # (" ", "-" or "+", the line)
    for line in out.splitlines():
        if line.startswith("--- "):
            path = line[4:].strip()
        elif line.startswith(("+++", "@@", "#")) or path is None:
            continue
        else:
            hunk.append((line[:1] or " ", line[1:]))
    if not any(kind == "-" for kind, _ in hunk):
        return None
    return in_place(name, path, hunk, tests)


def in_place(name: str, path: str, hunk: list[tuple[str, str]], tests: tuple[str, ...]) -> Mutant:
    """mutmut shows a method one level out (it holds methods outside their class), the first line
    of each statement dedented and its continuation lines not: the hunk's lines are found in the
    source by their text without indentation, and each line put in takes the indentation of the
    line it replaces."""
    def joined(lines: list[str]) -> str:
        return "".join(line + "\n" for line in lines)
    old = [text for kind, text in hunk if kind != "+"]
    mutant = Mutant(name, path, joined(old), joined([text for kind, text in hunk if kind != "-"]), tests)
    source = (ROOT / path).read_text().splitlines()
    if joined(source).count(mutant.original) == 1:
        return mutant
    key = [line.strip() for line in old]
    starts = [i for i in range(len(source) - len(old) + 1) if [ln.strip() for ln in source[i:i + len(old)]] == key]
    if len(starts) != 1:
        return mutant  # reported stale by run()
    at, mutated, indent, previous = starts[0], [], "", " "
    for kind, text in hunk:
        if kind == "+":
            mutated.append(indent + text.lstrip())
        else:
            line = source[at]
            at += 1
            if kind == " ":
                mutated.append(line)
            elif previous != "-":  # the first line of those removed: what is put in starts there
                indent = line[:len(line) - len(line.lstrip())]
        previous = kind
    return Mutant(name, path, joined(source[starts[0]:at]), joined(mutated), tests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mutmut_dir", type=Path, help="the scratch dir given to bench/mutmut.sh")
    parser.add_argument("pattern", help="mutant names, e.g. 'snr_triton.fused_op.x_register*'")
    parser.add_argument("--tests", nargs="+", default=["tests/test_cpu.py", "tests/test_compile.py",
                                                       "tests/test_clipping.py", "tests/test_8bit_states.py"])
    parser.add_argument("-k", default="not triton", help="pytest -k expression (default: the fast backends)")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--every", type=int, default=1, help="a sample: every N-th mutant (default: all)")
    parser.add_argument("--offset", type=int, default=0, help="the sample starts at this mutant (with --every)")
    parser.add_argument("--uncaught", action="store_true", help="only the mutants mutmut did not catch")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    repo = args.mutmut_dir / "repo"
    tests = (*args.tests, "-k", args.k)
    rows, counts = ["| mutant | result | first failure |", "|---|---|---|"], {}
    for name in mutant_names(repo, args.pattern, args.uncaught)[args.offset::args.every]:
        mutant = as_mutant(repo, name, tests)
        result, seconds, detail = run(mutant, args.timeout) if mutant else ("not planted", 0.0, "no diff")
        counts[result] = counts.get(result, 0) + 1
        rows.append(f"| {name} | {result} | {detail} |")
        print(f"{name}: {result} {detail} ({seconds:.0f} s)", flush=True)
    print(", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.markdown:
        args.markdown.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
