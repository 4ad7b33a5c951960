"""Service benchmark: `ragpipe serve` under load on 127.0.0.1, against the library in process.

The version holds N chunks (default 100k) embedded with the deterministic embedder, as in the query
benchmark; queries are Cranfield queries encoded by the real all-MiniLM-L6-v2 on ONNX Runtime and
relabelled with the version's model id. The server runs in a process of its own (uvicorn, one
worker); the load comes from asyncio clients over keep-alive connections. Every query text is used
once (a round suffix), so no cache answers it. Measures:

- burst: 256 concurrent queries, against the encoder alone embedding the same 256 in one batch, and
  against the same 256 one at a time;
- single: p50 of one query at a time over HTTP, against the library's p50 in process;
- load: C concurrent clients for S seconds while the alias swaps between two versions every second:
  latency percentiles, 429s, requests without an answer, and responses whose hits are not all from
  the version the response names.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.query import Relabelled

HOST = "127.0.0.1"
RETRY_AFTER_CAP_S = 0.1  # how long a shed load client waits before it asks again


class Connection:
    """One keep-alive HTTP/1.1 connection: POST a JSON body, read the status and JSON answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Connection":
        return cls(*await asyncio.open_connection(HOST, port))

    async def post(self, path: str, body: dict[str, Any], timeout: float) -> tuple[int, Any]:
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        return await asyncio.wait_for(self._response(), timeout)

    async def _response(self) -> tuple[int, Any]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (line.partition(": ") for line in lines[1:]) if k.lower() == "content-length")
        return status, json.loads(await self.reader.readexactly(length))

    def close(self) -> None:
        self.writer.close()


def queries_of(shared: Path) -> list[str]:
    return [json.loads(line)["text"] for line in open(shared / "cranfield" / "queries.jsonl", encoding="utf-8")]


def variants(queries: list[str], count: int, tag: str) -> list[str]:
    return [f"{queries[i % len(queries)]} ({tag} {i})" for i in range(count)]


async def burst(port: int, texts: list[str]) -> tuple[float, list[int], Any]:
    """All ``texts`` sent at once, one connection each; seconds until the last answer, the statuses, and
    the first answer other than 200 (None when there is none)."""
    connections = [await Connection.open(port) for _ in texts]
    started = time.perf_counter()
    answers = await asyncio.gather(*(c.post("/v1/search", {"query": t, "k": 10}, 60) for c, t in zip(connections, texts)))
    elapsed = time.perf_counter() - started
    for c in connections:
        c.close()
    return elapsed, [status for status, _ in answers], next((a for s, a in answers if s != 200), None)


async def one_at_a_time(port: int, texts: list[str]) -> tuple[float, list[float]]:
    """``texts`` one after another on one connection: total seconds and each request's milliseconds."""
    connection = await Connection.open(port)
    latencies = []
    started = time.perf_counter()
    for text in texts:
        t = time.perf_counter()
        status, _ = await connection.post("/v1/search", {"query": text, "k": 10}, 60)
        assert status == 200, status
        latencies.append((time.perf_counter() - t) * 1000)
    elapsed = time.perf_counter() - started
    connection.close()
    return elapsed, latencies


async def load(port: int, queries: list[str], clients: int, seconds: float, timeout: float) -> dict[str, Any]:
    """``clients`` closed-loop clients for ``seconds``: what came back, and whether every response's
    hits all come from the version it names."""
    stats: dict[str, Any] = {"ok_ms": [], "shed": 0, "unanswered": 0, "failed": {}, "mixed_versions": 0, "versions": set()}
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        connection = await Connection.open(port)
        n = 0
        while time.perf_counter() < stop:
            n += 1
            text = f"{queries[(i * 7919 + n) % len(queries)]} (client {i} request {n})"
            started = time.perf_counter()
            try:
                status, body = await connection.post("/v1/search", {"query": text, "k": 10}, timeout)
            except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                stats["unanswered"] += 1
                connection.close()
                connection = await Connection.open(port)
                continue
            if status == 200:
                stats["ok_ms"].append((time.perf_counter() - started) * 1000)
                stats["versions"].add(body["version"])
                if any(h["index_version"] != body["version"] for h in body["hits"]):
                    stats["mixed_versions"] += 1
            elif status == 429:
                stats["shed"] += 1
                await asyncio.sleep(RETRY_AFTER_CAP_S)  # an eager client: Retry-After says 1 s at least
            else:
                stats["failed"][status] = stats["failed"].get(status, 0) + 1
        connection.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    ok = sorted(stats["ok_ms"])
    pct = lambda p: round(ok[min(len(ok) - 1, int(len(ok) * p))], 2) if ok else None  # noqa: E731
    return {"clients": clients, "seconds": seconds, "answered_200": len(ok), "qps": round(len(ok) / seconds, 1),
            "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99), "shed_429": stats["shed"],
            "unanswered": stats["unanswered"], "failed": stats["failed"], "mixed_versions": stats["mixed_versions"],
            "versions_seen": len(stats["versions"])}


def swap_every_second(url: str, home: Path, versions: list[str], stop: threading.Event, swaps: list[int]) -> None:
    from registry import Registry, RegistryConfig

    with Registry.open(RegistryConfig(database_url=url, home=home)) as registry:
        i = 0
        while not stop.wait(1.0):
            i += 1
            registry.swap_alias("bench", versions[i % len(versions)])
            swaps.append(i)


def encoder(home: Path) -> Relabelled:
    from pipeline.deterministic import DeterministicEmbedder
    from pipeline.encoders import OnnxModelEncoder

    return Relabelled(OnnxModelEncoder("sentence-transformers/all-MiniLM-L6-v2", home / "cache"),
                      DeterministicEmbedder().model_id)


def build(shared: Path, size: int, url: str, home: Path) -> list[str]:
    """Publish two versions of ``size`` chunks (the second changes 50 documents); the alias names the first."""
    from benchmarks.noop import _sentences
    from benchmarks.publish import make_docs
    from pipeline.config import IndexConfig
    from pipeline.deterministic import DeterministicEmbedder
    from pipeline.runner import run_index
    from pipeline.sources import scan_records
    from registry import Registry, RegistryConfig

    docs = make_docs(_sentences(shared), size, seed=size)
    config = IndexConfig(index="bench", artifacts=str(home / "artifacts"), min_recall=0.0)
    versions = []
    with Registry.open(RegistryConfig(database_url=url, home=home)) as registry:
        for revision in range(2):
            changed = {d: (f"{t} (revision {revision})" if revision and i < 50 else t) for i, (d, t) in enumerate(docs.items())}
            scan = scan_records(((d, t, {}) for d, t in changed.items()), "bench")
            versions.append(run_index(scan, registry, DeterministicEmbedder(), config).version)
        registry.swap_alias("bench", versions[0])
    return versions


def serve_here(url: str, home: Path, port: int, threads: int, max_queue_wait_ms: float | None,
               deadline_s: float) -> None:
    """The server process: the app on the relabelled real encoder, uvicorn on 127.0.0.1."""
    import uvicorn

    from registry import RegistryConfig
    from service.app import create_app
    from service.config import ServeConfig

    config = ServeConfig(indexes=("bench",), host=HOST, port=port, search_threads=threads, poll_interval=1.0,
                         max_queue_wait_ms=max_queue_wait_ms, deadline_s=deadline_s, registry=RegistryConfig(database_url=url, home=home))
    uvicorn.run(create_app(config, encoder=encoder(home)), host=HOST, port=port, log_level="warning",
                access_log=False)


def wait_ready(port: int, process: subprocess.Popen[bytes], timeout: float = 600) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server never became ready")


def paired_single(port: int, url: str, home: Path, texts: list[str]) -> dict[str, float]:
    """One query at a time, alternately in process (the library) and over HTTP (a keep-alive
    connection), so that both see the same machine: p50 of each."""
    import http.client

    from retrieval import Retriever

    library, over_http = [], []
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    with Retriever.open("bench", url, home=home, encoder=encoder(home), follow=False) as retriever:
        for t in texts[:5]:
            retriever.search(t + " (warm)", k=10)
        for t in texts:
            started = time.perf_counter()
            retriever.search(t + " (library)", k=10)
            library.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            connection.request("POST", "/v1/search", json.dumps({"query": t + " (http)", "k": 10}),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            assert response.status == 200, response.status
            over_http.append((time.perf_counter() - started) * 1000)
    connection.close()
    http_p50, library_p50 = statistics.median(over_http), statistics.median(library)
    return {"queries": len(texts), "http_p50_ms": round(http_p50, 2), "library_p50_ms": round(library_p50, 2),
            "http_minus_library_ms": round(http_p50 - library_p50, 2)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextmanager
def server(url: str, home: Path, args: argparse.Namespace, max_queue_wait_ms: float | None) -> Iterator[int]:
    """A server process serving the alias ``bench``; yields its port once /readyz answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "benchmarks", "serve", "--search-threads", str(args.search_threads),
               "--deadline-s", str(args.deadline_s), "--serve", url, str(home), str(port)]
    if max_queue_wait_ms is not None:
        command += ["--max-queue-wait-ms", str(max_queue_wait_ms)]
    with open(home / f"server-{port}.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        try:
            wait_ready(port, process)
            yield port
        finally:
            process.terminate()
            process.wait(timeout=60)


def measure(shared: Path, url: str, home: Path, versions: list[str], args: argparse.Namespace) -> dict[str, Any]:
    queries = queries_of(shared)
    out: dict[str, Any] = {}
    enc = encoder(home)
    enc.embed(variants(queries, 16, "warm"))
    alone = []
    for r in range(args.rounds):
        texts = variants(queries, args.burst, f"encoder round {r}")
        started = time.perf_counter()
        enc.embed(texts)
        alone.append(time.perf_counter() - started)
    del enc
    with server(url, home, args, None) as port:
        asyncio.run(one_at_a_time(port, variants(queries, 20, "warm")))
        bursts, sequential, statuses = [], [], []
        for r in range(args.rounds):  # alternated: a noisy neighbour hits both
            elapsed, got, refused = asyncio.run(burst(port, variants(queries, args.burst, f"burst round {r}")))
            bursts.append(elapsed)
            statuses += got
            out.setdefault("burst_refusal", refused)
            sequential.append(asyncio.run(one_at_a_time(port, variants(queries, args.burst, f"sequential round {r}")))[0])
        out["single"] = paired_single(port, url, home, variants(queries, 200, "single"))
    encoder_s, burst_s, sequential_s = (statistics.median(x) for x in (alone, bursts, sequential))
    out["burst"] = {"queries": args.burst, "encoder_alone_one_batch_s": round(encoder_s, 3),
                    "burst_s": round(burst_s, 3), "burst_over_encoder": round(burst_s / encoder_s, 2),
                    "one_at_a_time_s": round(sequential_s, 3),
                    "speedup_over_one_at_a_time": round(sequential_s / burst_s, 2),
                    "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))}}
    # the load phase with a latency target: a request that would wait longer is shed with 429
    with server(url, home, args, args.load_queue_wait_ms) as port:
        asyncio.run(one_at_a_time(port, variants(queries, 20, "warm")))
        stop, swaps = threading.Event(), []
        swapper = threading.Thread(target=swap_every_second, args=(url, home, versions, stop, swaps))
        swapper.start()
        try:
            out["load"] = asyncio.run(load(port, queries, args.clients, args.seconds, timeout=30))
        finally:
            stop.set()
            swapper.join()
    out["load"].update(alias_swaps=len(swaps), max_queue_wait_ms=args.load_queue_wait_ms)
    return out


def run(shared: Path, args: argparse.Namespace) -> dict[str, Any]:
    from registry import RegistryConfig
    from registry.db import scratch_database

    if not 0 < args.seconds <= 600 or not 0 < args.burst <= 1024 or not 0 < args.deadline_s <= 600:
        raise SystemExit("--seconds and --deadline-s must be within (0, 600] and --burst within (0, 1024]")
    registry_config = RegistryConfig.from_env()
    out: dict[str, Any] = {"benchmark": "serve", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                           "chunks": args.chunks, "search_threads": args.search_threads, "cpus": os.cpu_count(),
                           "load_average_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="ragpipe-serve-") as tmp, \
            scratch_database(registry_config.database_url, registry_config.home) as url:
        home = Path(tmp)
        started = time.perf_counter()
        versions = build(shared, args.chunks, url, home)
        out["build_seconds"] = round(time.perf_counter() - started, 1)
        out.update(measure(shared, url, home, versions, args))
    out["load_average_after"] = round(os.getloadavg()[0], 2)  # the machine is shared: how busy it was
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks serve", description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load phase (at most 600)")
    parser.add_argument("--burst", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="burst and encoder rounds (medians)")
    parser.add_argument("--search-threads", type=int, default=2)
    parser.add_argument("--load-queue-wait-ms", type=float, default=50.0,
                        help="the load phase's latency target (max_queue_wait_ms): longer waits are shed with 429")
    parser.add_argument("--max-queue-wait-ms", type=float, default=None, help=argparse.SUPPRESS)  # the server's
    parser.add_argument("--deadline-s", type=float, default=60.0,
                        help="the server's request deadline (RAGPIPE_SERVE_DEADLINE_S): room for the whole burst")
    parser.add_argument("--shared-data", type=Path, default=None)
    parser.add_argument("--serve", nargs=3, metavar=("URL", "HOME", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_here(args.serve[0], Path(args.serve[1]), int(args.serve[2]), args.search_threads,
                   args.max_queue_wait_ms, args.deadline_s)
        return 0
    from benchmarks import shared_data_dir

    print(json.dumps(run(shared_data_dir(args.shared_data), args), indent=2))
    return 0
