"""Embedding throughput per backend on this machine's CPU, on real chunk texts.

The texts are the chunks ragpipe cuts from the Cranfield abstracts (real tokenizer, titles as chunk
context), embedded once per backend after a warm-up batch:

- ``torch``: sentence-transformers on torch fp32 (the product's document embedder);
- ``onnx``: the ONNX Runtime export the retrieval library uses for queries, fp32;
- ``onnx-int8``: that export quantized with ONNX Runtime's dynamic int8 quantization (per-channel,
  reduced range) — vectors that are *not* interchangeable with fp32 ones.

For each backend: chunks per second and the cosine of its vectors with torch's (min and mean).
Retrieval quality per backend is not measured here yet.
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


def _int8_session(onnx_path: Path, target: Path) -> Any:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(onnx_path), str(target), per_channel=True, reduce_range=True, weight_type=QuantType.QInt8)
    return ort.InferenceSession(str(target), ort.SessionOptions(), providers=["CPUExecutionProvider"])


def run(shared: Path, limit: int, batch_size: int) -> dict[str, Any]:
    from retrieval.onnx import OnnxEncoder

    torch_embedder = SentenceTransformerEmbedder(DEFAULT_MODEL, device="cpu", batch_size=batch_size)
    texts = chunk_texts(shared, limit, torch_embedder)
    out: dict[str, Any] = {
        "benchmark": "embed", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "model": DEFAULT_MODEL, "chunks": len(texts), "batch_size": batch_size,
        "mean_chars": round(float(np.mean([len(t) for t in texts])), 1), "backends": {},
    }
    with tempfile.TemporaryDirectory(prefix="ragpipe-embed-") as tmp:
        onnx = OnnxEncoder(DEFAULT_MODEL, Path(tmp), batch_size=batch_size)
        int8 = OnnxEncoder(DEFAULT_MODEL, Path(tmp), batch_size=batch_size)
        int8._session = _int8_session(onnx.onnx_path, Path(tmp) / "model-int8.onnx")  # same tokenizer and pooling
        backends = {"torch": torch_embedder.embed, "onnx": onnx.embed, "onnx-int8": int8.embed}
        reference: np.ndarray | None = None
        for name, embed in backends.items():
            embed(texts[:batch_size])  # warm-up: model load, first-call allocations
            started = time.perf_counter()
            vectors = embed(texts)
            seconds = time.perf_counter() - started
            entry: dict[str, Any] = {"seconds": round(seconds, 2), "chunks_per_second": round(len(texts) / seconds, 1)}
            if reference is None:
                reference = vectors
            else:
                cosine = (vectors * reference).sum(axis=1)
                entry["cosine_vs_torch_min"] = round(float(cosine.min()), 6)
                entry["cosine_vs_torch_mean"] = round(float(cosine.mean()), 6)
                entry["speedup_vs_torch"] = round(out["backends"]["torch"]["seconds"] / seconds, 2)
            out["backends"][name] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks embed", description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=1000, help="how many Cranfield chunk texts to embed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shared-data", type=Path, default=None)
    args = parser.parse_args(argv)
    from benchmarks import shared_data_dir

    print(json.dumps(run(shared_data_dir(args.shared_data), args.chunks, args.batch_size), indent=2))
    return 0
