"""``python -m cluster up|run|down|status``: the local cluster from the command line (the Makefile's targets)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cluster import control
from cluster.api import ApiError
from cluster.processes import ClusterError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__)
    parser.add_argument("command", choices=["up", "run", "down", "status"])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("RAGPIPE_CLUSTER_DIR") or ".cluster"),
                        help="the cluster's directory (RAGPIPE_CLUSTER_DIR, default ./.cluster)")
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="the checkout whose DAGs and code run")
    parser.add_argument("--postgres", default=os.environ.get("RAGPIPE_CLUSTER_POSTGRES")
                        or "postgresql://postgres@127.0.0.1:5432/postgres",
                        help="a PostgreSQL server the cluster creates its databases on")
    parser.add_argument("--redis", default=os.environ.get("RAGPIPE_CLUSTER_REDIS") or "redis://127.0.0.1:6379/13",
                        help="the Celery broker: a Redis server and a database number of the cluster's own")
    parser.add_argument("--workers", type=int, default=2, help="how many Celery workers")
    parser.add_argument("--timeout", type=float, default=900.0, help="run: seconds to wait for the DAG run")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    try:
        if args.command == "up":
            control.up(root, args.repo, postgres_url=args.postgres, redis_url=args.redis, workers=args.workers)
        elif args.command == "down":
            control.down(root)
        elif args.command == "status":
            print(json.dumps(control.status(root), indent=1))
        else:
            result = control.run(root, timeout_s=args.timeout)
            print(json.dumps({k: result[k] for k in ("dag_run_id", "state", "workers", "artifacts")}))
            return 0 if result["state"] == "success" else 1
    except FileNotFoundError as exc:
        print(f"no cluster in {root} ({exc.filename}): run `make cluster` first", file=sys.stderr)
        return 1
    except (ClusterError, ApiError) as exc:
        print(f"cluster {args.command} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
