"""A serving process for tests: a retriever following an alias, driven line by line on stdin.

    python tests/rollout_reader.py DATABASE_URL HOME ALIAS [POLL_INTERVAL]

(POLL_INTERVAL, default 0.2 s: how often it re-reads the alias besides the registry's notifications.)

Commands (one per line; one JSON line answers each): ``state`` (what it serves, warm versions,
versions loaded so far, and the segments it downloaded), ``search KEY QUERY`` (the version and
route that served it, and the hits' chunk ids), ``quit``.
"""

from __future__ import annotations

import json
import sys

from pipeline.deterministic import DeterministicEmbedder
from retrieval import Retriever


def main(url: str, home: str, alias: str, poll_interval: str = "0.2") -> int:
    with Retriever.open(alias, url, home=home, encoder=DeterministicEmbedder(), poll_interval=float(poll_interval),
                        warm_seconds=120, stats_interval=0) as retriever:
        print(json.dumps({"ready": True, **retriever.rollout_state()}), flush=True)
        for line in sys.stdin:
            command, _, rest = line.strip().partition(" ")
            if command == "quit":
                break
            if command == "state":
                fetched = list(retriever.segment_cache.fetched.segments)
                print(json.dumps({**retriever.rollout_state(), "fetched": fetched}), flush=True)
            elif command == "search":
                key, _, query = rest.partition(" ")
                hits = retriever.search(query, k=3, route_key=key)
                print(json.dumps({"version": hits.version, "route": hits.route,
                                  "chunks": [h.chunk_id for h in hits]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
