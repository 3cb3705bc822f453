#!/usr/bin/env bash
# mutmut over the pure-Python core ([tool.mutmut] in pyproject.toml: which modules, which tests),
# in a scratch clone, since mutmut writes mutants/ beside the sources; the clone's
# snr_triton/kernels points at its own kernels/ (the editable install maps it, a copy does not).
# Needs the dev extra (pip install -e ".[dev]"). Not run in CI: about an hour per 500 mutants on
# 2 cores. Prints the score per module; `mutmut show NAME` in the clone shows a mutant.
# Usage: bash bench/mutmut.sh [scratch-dir [modules, e.g. snr_triton/tables.py [-- mutant names]]]:
# the modules given replace only_mutate; names after -- (globs, e.g.
# 'snr_triton.tables.x*count_step*') run only those mutants
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}/repo"
shift || true
modules=() names=()
while [ $# -gt 0 ]; do
    if [ "$1" = "--" ]; then shift; names=("$@"); break; fi
    modules+=("$1"); shift
done
set -- "${modules[@]}"
rm -rf "$work"
git clone -q "$repo" "$work"
cp "$repo/pyproject.toml" "$work/"  # the configuration as it is here, committed or not
if [ $# -gt 0 ]; then
    python3 - "$work/pyproject.toml" "$@" <<'PY'
import re, sys
path, modules = sys.argv[1], sys.argv[2:]
text = open(path).read()
text = re.sub(r"only_mutate = \[[^\]]*\]", "only_mutate = " + repr(modules).replace("'", '"'), text)
open(path, "w").write(text)
PY
fi
ln -s ../kernels "$work/snr_triton/kernels"
cd "$work"
# one intra-op thread: mutmut forks a child per mutant from a process that has run torch, and a
# child forked after torch's thread pool started blocks in its first parallel op, using no CPU
# (CI=true as in CI: a mutant that makes a backend unavailable fails the tests, not skips them)
CI=true OMP_NUM_THREADS=1 TRITON_INTERPRET=1 mutmut run "${names[@]}" || true
mutmut results --all true | python3 "$repo/bench/mutmut_score.py"
echo "mutants are in $work (mutmut results / mutmut show NAME there)"
