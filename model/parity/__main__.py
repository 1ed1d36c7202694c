"""python -m model.parity FIXTURE.pt [...]: PASS/FAIL per expected output; exit 1 on any FAIL."""

import argparse
import sys

import torch

from model.parity.harness import run_fixture


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m model.parity", description=__doc__)
    parser.add_argument("fixtures", nargs="+", help="fixture .pt files in the shared reference format")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    failed = 0
    for path in args.fixtures:
        try:
            report = run_fixture(path)
        except Exception as exc:  # a broken fixture must not hide the others' results
            print(f"{path} FAIL: {type(exc).__name__}: {exc}")
            failed += 1
            continue
        print(report.format(), flush=True)
        failed += not report.ok
    print(f"{len(args.fixtures) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
