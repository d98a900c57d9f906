"""Wall time of the test suite, per file and in total; writes ``bench/results/test_suite.json``.

Usage (from the repository root)::

    python bench/test_suite.py                     # the whole suite (what .ci/run runs after setup)
    python bench/test_suite.py tests/test_moe.py --out /tmp/moe.json

Runs ``pytest -q`` with a JUnit XML report and records: the command, the wall time, the counts of
passed / failed / skipped tests, the time spent in each test file (tests plus their fixtures), the
slowest tests, and the machine's load while it ran. The suite must pass for the file to be written.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, LoadSampler, provenance  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", default=["tests"])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "test_suite.json"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                   *args.paths]
        started = time.perf_counter()
        with LoadSampler(period=30.0) as load:
            code = subprocess.run(command, cwd=REPO).returncode
        wall = time.perf_counter() - started
        cases = ET.parse(junit).getroot().iter("testcase")
        per_file, outcomes, tests = defaultdict(float), defaultdict(int), []
        for case in cases:
            seconds = float(case.get("time", 0))
            path = case.get("classname", "").replace(".", "/") + ".py"
            per_file[path] += seconds
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            outcomes[outcome] += 1
            tests.append((seconds, f"{path}::{case.get('name')}"))
    if code != 0:
        print(f"error: the suite failed (exit status {code}, {dict(outcomes)}); {args.out} not written",
              file=sys.stderr)
        return 1
    report = provenance("python bench/test_suite.py " + " ".join(argv))
    report.update(pytest_command="pytest -q " + " ".join(args.paths), wall_s=round(wall, 1),
                  outcomes=dict(outcomes), load=load.summary(),
                  seconds_per_file={k: round(v, 1) for k, v in sorted(per_file.items(), key=lambda kv: -kv[1])},
                  slowest_tests=[{"test": name, "seconds": round(seconds, 1)}
                                 for seconds, name in sorted(tests, reverse=True)[:15]])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{dict(outcomes)} in {wall:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
