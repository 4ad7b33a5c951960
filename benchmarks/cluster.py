"""Cluster benchmark: the rag_index DAG on a local CeleryExecutor cluster (``make cluster``), one worker
against two.

For each worker count a fresh cluster is started (``cluster.control.up``), a generated corpus of
unique texts is uploaded to its S3 server, and ``rag_index`` is triggered twice through the REST API:

- ``full_build_s``: the first run (discover, chunk, embed with the real default model, build,
  validate, publish, gc), from trigger to the run's end;
- per-task figures of that run: ``queue_to_start_s`` (median seconds from a task instance being
  queued to its start on a worker) and ``short_task_s`` (median duration of the tasks that do almost
  nothing, ``changed`` and ``work_lists``: the fixed cost of any task — a process, the DAG file
  parsed, the execution API), and each embedding task's duration and worker;
- ``noop``: a second run over the unchanged source: its seconds, and what it asked of the object
  store (from the S3 server's request log): listings, object reads and the bytes of the objects read.

The JSON also has the two counts' ratio. The machine's cores are shared by every process of the
cluster (scheduler, api-server, workers): the ratio says where the time goes, not how a cluster of
separate machines scales.

``--chunks N --embedder endpoint`` measures the mechanics at scale: N sections (one chunk each)
embedded through ragpipe's OpenAI-compatible endpoint client by a local server that answers with
the deterministic embedder's vectors (so embedding costs HTTP and hashing, not a model), embedding
in work lists of ``--embed-task-size`` texts and the full build fanned out into segments of
``--segment-rows`` chunks, one ``build_segment`` task each. ``task_seconds`` sums each task's
durations by task id (where the time goes), with each ``build_segment`` task's worker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from cluster import control
from cluster.settings import ClusterSettings

REPO = Path(__file__).resolve().parent.parent
WORDS = ("flutter drag lift wing spar rib aileron vortex shock boundary layer laminar turbulent nozzle thrust "
         "pressure gradient heat flux ablation shield reentry corridor stall buffet trim elevator rudder flap").split()
_REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (/[^ ?"]*)(\?[^ "]*)? HTTP')


def corpus(tag: str, documents: int, sections: int) -> dict[str, str]:
    rng = random.Random(tag)
    out = {}
    for d in range(documents):
        parts = [f"# {tag} report {d}"]
        for s in range(sections):
            parts.append(f"## Section {s}\n\n{tag}{d}x{s} " + " ".join(rng.choice(WORDS) for _ in range(120)) + ".")
        out[f"report-{d}.md"] = "\n\n".join(parts) + "\n"
    return out


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def s3_requests(settings: ClusterSettings, offset: int) -> list[tuple[str, str, str]]:
    with open(settings.log_file("s3"), "rb") as fh:
        fh.seek(offset)
        text = fh.read().decode(errors="replace")
    return [(m.group(1), m.group(2), m.group(3) or "") for m in map(_REQUEST.search, text.splitlines()) if m]


def object_store_use(settings: ClusterSettings, requests: list[tuple[str, str, str]]) -> dict[str, Any]:
    """Listings, object reads (GET of a key) and the bytes of the objects read."""
    store = control._object_store(settings)
    reads = [path.lstrip("/") for method, path, query in requests
             if method == "GET" and path.count("/") >= 2 and "list-type" not in query]
    sizes = {}
    for key in set(reads):
        try:
            sizes[key] = int(store.info(key)["size"])
        except FileNotFoundError:  # a workspace file removed since
            sizes[key] = 0
    return {"requests": len(requests), "listings": sum("list-type" in q for _m, _p, q in requests),
            "object_reads": len(reads), "bytes_read": sum(sizes[k] for k in reads)}


class EmbeddingsEndpoint:
    """A local server of the OpenAI embeddings API (``POST /v1/embeddings``) answering with the
    deterministic embedder's vectors: what the workers embed through at scale."""

    def __init__(self, dim: int = 384) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from pipeline.deterministic import DeterministicEmbedder

        embedder, lock = DeterministicEmbedder(dim=dim), threading.Lock()
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    vectors = embedder.embed(list(payload["input"]))
                    outer.requests += 1
                body = json.dumps({"object": "list", "model": payload["model"],
                                   "data": [{"object": "embedding", "index": i, "embedding": v.tolist()}
                                            for i, v in enumerate(vectors)],
                                   "usage": {"prompt_tokens": 0, "total_tokens": 0}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        outer = self
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "EmbeddingsEndpoint":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def task_seconds(tis: list[dict[str, Any]]) -> dict[str, float]:
    """Each task id's durations summed over its mapped instances."""
    out: dict[str, float] = {}
    for t in tis:
        out[t["task_id"]] = round(out.get(t["task_id"], 0.0) + float(t.get("duration") or 0.0), 2)
    return out


def one_cluster(workers: int, files: dict[str, str], root: Path, *, postgres: str, redis: str,
                overrides: dict[str, str] | None = None) -> dict[str, Any]:
    settings = control.up(root, REPO, postgres_url=postgres, redis_url=redis, workers=workers,
                          overrides=overrides, say=lambda m: print(m, file=sys.stderr))
    try:
        store = control._object_store(settings)
        for name, body in files.items():
            store.pipe(f"{settings.bucket}/sources/bench/{name}", body.encode())
        source = f"s3://{settings.bucket}/sources/bench/"
        api = control.client(settings)
        api.unpause(control.DAG_ID)
        started = time.monotonic()
        run_id = api.trigger(control.DAG_ID, {"source": source, "index": "bench"})
        state = api.wait_for_run(control.DAG_ID, run_id, timeout_s=3600, poll_s=0.5)
        full_s = time.monotonic() - started
        tis = api.task_instances(control.DAG_ID, run_id)
        queued = [s for s in (_seconds(t.get("queued_when"), t.get("start_date")) for t in tis) if s is not None]
        short = [t["duration"] for t in tis if t["task_id"] in ("changed", "work_lists") and t.get("duration")]
        embeds = [{"map_index": t["map_index"], "seconds": round(t["duration"] or 0, 2), "worker": t["hostname"]}
                  for t in tis if t["task_id"] == "embed"]
        offset = settings.log_file("s3").stat().st_size
        started = time.monotonic()
        noop_id = api.trigger(control.DAG_ID, {"source": source, "index": "bench"})
        noop_state = api.wait_for_run(control.DAG_ID, noop_id, timeout_s=600, poll_s=0.5)
        noop_s = time.monotonic() - started
        time.sleep(1)
        use = object_store_use(settings, s3_requests(settings, offset))
        return {"workers": workers, "state": state, "full_build_s": round(full_s, 1),
                "workers_used": sorted({t["hostname"] for t in tis if t.get("hostname")}),
                "queue_to_start_s": round(statistics.median(queued), 2) if queued else None,
                "short_task_s": round(statistics.median(short), 2) if short else None,
                "embed_tasks": embeds,
                "task_seconds": task_seconds(tis),
                "build_segment_tasks": [{"map_index": t["map_index"], "seconds": round(t["duration"] or 0, 2),
                                         "worker": t["hostname"]} for t in tis if t["task_id"] == "build_segment"],
                "noop": {"state": noop_state, "seconds": round(noop_s, 1), **use}}
    finally:
        control.down(root, say=lambda m: print(m, file=sys.stderr))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks cluster", description=__doc__)
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--sections", type=int, default=40, help="sections (about one chunk each) per document")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--chunks", type=int, default=0, help="sections in all (documents = chunks / sections)")
    parser.add_argument("--embedder", choices=["model", "endpoint"], default="model",
                        help="'endpoint': a local OpenAI-compatible server with deterministic vectors")
    parser.add_argument("--segment-rows", type=int, default=25_000)
    parser.add_argument("--embed-task-size", type=int, default=5_000)
    args = parser.parse_args(argv)
    documents = max(1, args.chunks // args.sections) if args.chunks else args.documents
    results = []
    with contextlib.ExitStack() as stack:
        overrides = None
        if args.embedder == "endpoint":
            endpoint = stack.enter_context(EmbeddingsEndpoint())
            overrides = {"RAGPIPE_MODEL": "openai:deterministic-hashing-384", "RAGPIPE_EMBEDDINGS_URL": endpoint.url,
                         "RAGPIPE_SEGMENT_ROWS": str(args.segment_rows),
                         "RAGPIPE_EMBED_TASK_SIZE": str(args.embed_task_size)}
        for count in (int(w) for w in args.workers.split(",")):
            files = corpus(f"b{uuid.uuid4().hex[:6]}", documents, args.sections)  # new texts: nothing cached
            with tempfile.TemporaryDirectory(prefix="ragpipe-bench-cluster-") as tmp:
                results.append(one_cluster(count, files, Path(tmp) / "cluster", postgres=args.postgres,
                                           redis=args.redis, overrides=overrides))
    by = {r["workers"]: r for r in results}
    out: dict[str, Any] = {"benchmark": "cluster", "machine": platform.platform(), "documents": documents,
                           "sections_per_document": args.sections, "embedder": args.embedder,
                           "segment_rows": args.segment_rows if args.embedder == "endpoint" else None, "runs": results}
    if 1 in by and 2 in by:
        out["full_build_ratio_1_to_2"] = round(by[1]["full_build_s"] / by[2]["full_build_s"], 2)
    print(json.dumps(out, indent=1))
    return 0 if all(r["state"] == "success" for r in results) else 1
