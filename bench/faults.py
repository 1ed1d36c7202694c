"""Recovery times of the service from faults on this machine: Redis SIGKILLed and restarted from its
append-only file, a worker, the API and the launcher SIGKILLed (issue 9).

    .venv/bin/python -m bench.faults [-k EXPR]

Runs the fault tests (tests/service/test_faults.py: real redis-server, uvicorn and worker processes, the
`tiny` weights) and prints each recovery they measured, in seconds from the fault (or from Redis being
back) until the service answers, a job is re-queued, a worker is ready again or the jobs have succeeded;
then the machine (CPU count, load average). The tests pass or fail as usual; a failure is printed too.
A worker's recovery includes loading its model, so it grows with the model (seconds for `tiny` here).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECOVERY = re.compile(r"^recovery: (?P<seconds>[\d.]+) s - (?P<what>.+)$", re.M)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="pytest -k expression: run only some of the fault tests")
    args = parser.parse_args()
    command = [sys.executable, "-m", "pytest", "tests/service/test_faults.py", "-q", "-s", "-p", "no:cacheprovider"]
    if args.k:
        command += ["-k", args.k]
    started = time.monotonic()
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    found = RECOVERY.findall(run.stdout)
    width = max((len(what) for _, what in found), default=10)
    print(f"{'fault -> recovered':<{width}}  seconds")
    for seconds, what in found:
        print(f"{what:<{width}}  {float(seconds):7.2f}")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\n{os.cpu_count()} CPUs, load average {load}; {time.monotonic() - started:.0f} s in all")
    if run.returncode != 0:
        print(run.stdout[-4000:], run.stderr[-2000:], sep="\n")
        sys.exit(run.returncode)


if __name__ == "__main__":
    main()
