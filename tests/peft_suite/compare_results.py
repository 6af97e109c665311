"""Compare two junit XML files of the same tests: ``python compare_results.py PLAIN.xml FASTPROMPT.xml
[--min-passed K] [--subset]``.

Prints the counts of each, then every test that passed in the first and not in the second (a regression:
exit code 1) and those that failed in the first and passed in the second. ``--min-passed K``: exit code 1
also when the first (with ``--subset``: the second) passed fewer than K tests (a run that tested nothing
has no regressions either). ``--subset``: the second ran a subset of the first's tests; only those count.
"""

from __future__ import annotations

import collections
import sys
import xml.etree.ElementTree as ET


def outcomes(path: str) -> dict[str, tuple[str, str]]:
    """{class::name: (passed | failed | skipped, message)} of a junit XML file."""
    found = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        state, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                state = "skipped" if child.tag == "skipped" else "failed"
                message = (child.get("message") or "")[:300].replace("\n", " ")
                break
        found[f"{case.get('classname')}::{case.get('name')}"] = (state, message)
    return found


def main(first: str, second: str, min_passed: int = 0, subset: bool = False) -> int:
    a, b = outcomes(first), outcomes(second)
    if subset:
        a = {k: v for k, v in a.items() if k in b}
    for path, results in ((first, a), (second, b)):
        print(path, dict(collections.Counter(state for state, _ in results.values())))
    regressions = [k for k, (s, _) in a.items() if s == "passed" and b.get(k, ("missing", ""))[0] != "passed"]
    fixed = [k for k, (s, _) in a.items() if s == "failed" and b.get(k, ("missing", ""))[0] == "passed"]
    print(f"passed in {first}, not in {second}: {len(regressions)}")
    for key in regressions:
        state, message = b.get(key, ("missing", ""))
        print(f"  [{state}] {key}\n      {message}")
    print(f"failed in {first}, passed in {second}: {len(fixed)}")
    for key in fixed:
        print(f"  {key}")
    passed = sum(state == "passed" for state, _ in (b if subset else a).values())
    if passed < min_passed:
        print(f"{first}: only {passed} tests passed, expected at least {min_passed}: the suite did not run")
        return 1
    return 1 if regressions else 0


if __name__ == "__main__":
    arguments = sys.argv[1:]
    minimum = 0
    only_common = "--subset" in arguments
    if only_common:
        arguments.remove("--subset")
    if "--min-passed" in arguments:
        at = arguments.index("--min-passed")
        minimum = int(arguments[at + 1])
        del arguments[at : at + 2]
    raise SystemExit(main(*arguments[:2], min_passed=minimum, subset=only_common))
