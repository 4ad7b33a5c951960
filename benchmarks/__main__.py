"""Entry point: ``python -m benchmarks NAME [options]`` (or ``make bench NAME=...``) prints one JSON result."""

from __future__ import annotations

import sys

from benchmarks import BENCHMARKS, run_benchmark


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(f"usage: python -m benchmarks {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 2
    return run_benchmark(sys.argv[1], sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
