"""Embedding throughput per backend on this machine's CPU, on real chunk texts.

The texts are the chunks ragpipe cuts from the Cranfield abstracts (real tokenizer, titles as chunk
context), embedded once per backend after a warm-up batch:

- ``torch``: sentence-transformers on torch fp32 (the default document embedder, ``MODEL``);
- ``onnx``: the ONNX Runtime export, fp32 (``MODEL#onnx``; the same vectors, the same model id);
- ``onnx-int8``: that export quantized with ONNX Runtime's dynamic int8 quantization (per-channel,
  reduced range; ``MODEL#onnx-int8``) — vectors that are *not* interchangeable with fp32 ones.

For each backend: chunks per second, the cosine of its vectors with torch's (min and mean), and the
retrieval quality it gives: Cranfield indexed with that backend (queries encoded by the matching
encoder), nDCG@10 of the vector search alone and of the default hybrid search with rescoring.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.chunking import chunk_document
from pipeline.evaluation import load_beir
from pipeline.sources import scan_records
from retrieval.models import DEFAULT_MODEL, SentenceTransformerEmbedder


def chunk_texts(shared: Path, limit: int, embedder: SentenceTransformerEmbedder) -> list[str]:
    docs, _queries, _qrels, titles = load_beir(shared / "cranfield")
    records = ((d, text, {"format": "text", "title": titles[d]} if titles[d] else {"format": "text"})
               for d, text in docs.items())
    counter = embedder.token_counter()
    texts: list[str] = []
    for doc in scan_records(records, "cranfield").documents:
        texts.extend(c.indexed_text for c in chunk_document(doc, counter, embedder.max_tokens))
        if len(texts) >= limit:
            break
    return texts[:limit]


BACKENDS = {"torch": "", "onnx": "#onnx", "onnx-int8": "#onnx-int8"}


def run(shared: Path, limit: int, batch_size: int, quality: bool) -> dict[str, Any]:
    from pipeline.embedding import make_embedder
    from pipeline.evaluation import evaluate
    from registry import RegistryConfig

    torch_embedder = SentenceTransformerEmbedder(DEFAULT_MODEL, device="cpu", batch_size=batch_size)
    texts = chunk_texts(shared, limit, torch_embedder)
    out: dict[str, Any] = {
        "benchmark": "embed", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "model": DEFAULT_MODEL, "chunks": len(texts), "batch_size": batch_size,
        "mean_chars": round(float(np.mean([len(t) for t in texts])), 1), "backends": {},
    }
    with tempfile.TemporaryDirectory(prefix="ragpipe-embed-") as tmp:
        reference: np.ndarray | None = None
        for name, suffix in BACKENDS.items():
            embedder = torch_embedder if not suffix else make_embedder(
                DEFAULT_MODEL + suffix, device="cpu", batch_size=batch_size, cache_dir=Path(tmp))
            embedder.embed(texts[:batch_size])  # warm-up: model load, first-call allocations
            started = time.perf_counter()
            vectors = embedder.embed(texts)
            seconds = time.perf_counter() - started
            entry: dict[str, Any] = {"model_id": embedder.model_id, "seconds": round(seconds, 2),
                                     "chunks_per_second": round(len(texts) / seconds, 1)}
            if reference is None:
                reference = vectors
            else:
                cosine = (vectors * reference).sum(axis=1)
                entry["cosine_vs_torch_min"] = round(float(cosine.min()), 6)
                entry["cosine_vs_torch_mean"] = round(float(cosine.mean()), 6)
                entry["speedup_vs_torch"] = round(out["backends"]["torch"]["seconds"] / seconds, 2)
            if quality:
                scores = evaluate(shared / "cranfield", RegistryConfig.from_env(), embedder, ["dense", "hybrid+rerank"])
                entry["cranfield_index_seconds"] = scores["index_seconds"]
                entry["ndcg@10_dense"] = scores["modes"]["dense"]["ndcg@10"]
                entry["ndcg@10_hybrid+rerank"] = scores["modes"]["hybrid+rerank"]["ndcg@10"]
            out["backends"][name] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks embed", description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=1000, help="how many Cranfield chunk texts to embed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-quality", action="store_true", help="skip the Cranfield nDCG per backend")
    parser.add_argument("--shared-data", type=Path, default=None)
    args = parser.parse_args(argv)
    from benchmarks import shared_data_dir

    print(json.dumps(run(shared_data_dir(args.shared_data), args.chunks, args.batch_size, not args.no_quality), indent=2))
    return 0
