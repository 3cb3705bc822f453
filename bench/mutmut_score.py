"""Score per module from `mutmut results --all true` (read on stdin): killed, timed out,
crashed (segfault: the mutant brought the test process down, which the tests notice), survived.

    mutmut results --all true | python bench/mutmut_score.py
"""

import collections
import re
import sys


def main() -> None:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in sys.stdin:
        name, _, status = line.strip().rpartition(": ")
        if "__mutmut_" in name:
            counts[re.split(r"\.x[_\u01c1]", name, maxsplit=1)[0]][status] += 1  # module.x_f, module.xǁClassǁf
    for module, c in sorted(counts.items()):
        run = sum(v for k, v in c.items() if k != "not checked")
        caught = c["killed"] + c["timeout"] + c["segfault"]
        score = f"{100 * caught / run:.1f}%" if run else "-"
        print(f"{module}: {c['killed']} killed, {c['timeout']} timed out, {c['segfault']} crashed, "
              f"{c['survived']} survived, "
              f"{c['not checked']} not run, of {sum(c.values())}: {score} caught")


if __name__ == "__main__":
    main()
