"""Entry point: ``python -m benchmarks NAME [options]`` prints one JSON result."""

from __future__ import annotations

import os
import sys

BENCHMARKS = {"noop": "benchmarks.noop", "publish": "benchmarks.publish", "query": "benchmarks.query",
              "embed": "benchmarks.embed"}


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(f"usage: python -m benchmarks {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 2
    module = __import__(BENCHMARKS[sys.argv[1]], fromlist=["main"])
    return module.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
