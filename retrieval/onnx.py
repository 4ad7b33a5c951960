"""An ONNX Runtime encoder: the same vectors as sentence-transformers, for queries and documents.

The model's transformer is exported once with ``torch.onnx`` into the ragpipe cache and run with
onnxruntime; tokenization uses the model's fast tokenizer, pooling and normalization follow the
model's sentence-transformers configuration (mean or CLS pooling). A test proves the vectors equal
sentence-transformers' (cosine >= 0.99999), so the model id is the same and versions built with the
torch model are served without re-embedding.

``MODEL#onnx-int8`` runs the export quantized to int8 (ONNX Runtime dynamic quantization, per
channel, reduced range): faster on CPUs, but its vectors are not the fp32 ones, so its model id keeps
the suffix — a version embedded with it is searched with it, never mixed with fp32 vectors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import ModelError
from retrieval.models import QUANTIZED, SPECIAL_TOKENS, HFTokenCounter, resolve_model, split_variant

logger = logging.getLogger(__name__)
_EXPORT_LOCK = threading.Lock()


_SUPPORTED_MODULES = {
    "sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
}


def _pooling(model_path: Path) -> str:
    modules_file = model_path / "modules.json"
    if modules_file.is_file():
        types = {m.get("type") for m in json.loads(modules_file.read_text())}
        if not types <= _SUPPORTED_MODULES:
            raise ModelError(f"{model_path} has modules {sorted(types - _SUPPORTED_MODULES)}; use the torch encoder")
    config_file = model_path / "1_Pooling" / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{model_path} has no 1_Pooling/config.json; use the torch encoder")
    config = json.loads(config_file.read_text())
    modes = [k for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
    if modes == ["pooling_mode_mean_tokens"]:
        return "mean"
    if modes == ["pooling_mode_cls_token"]:
        return "cls"
    raise ModelError(f"{model_path}: only mean or CLS pooling run on ONNX; use the torch encoder")


def export_onnx(model_path: Path, target: Path) -> None:
    """Export the model's transformer (input ids, attention mask, token types -> token embeddings)."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_path)).eval()

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    sample = torch.ones((1, 8), dtype=torch.long)
    axes = {0: "batch", 1: "tokens"}
    partial = target.with_name(target.name + f".{os.getpid()}.tmp")
    # the tracer warns about Python control flow it freezes; the test on equal vectors is what counts
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            TokenEmbeddings(model), (sample, sample, torch.zeros_like(sample)), str(partial),
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["token_embeddings"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes, "token_embeddings": axes},
            opset_version=17, dynamo=False,
        )
    partial.rename(target)


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantization of the weights: per channel, reduced range (the variant that kept
    Cranfield nDCG@10 closest to fp32; per-tensor lost more, see docs/benchmarks.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    partial = target.with_name(target.name + f".{os.getpid()}.tmp")
    quantize_dynamic(str(source), str(partial), per_channel=True, reduce_range=True, weight_type=QuantType.QInt8)
    partial.rename(target)


class OnnxEncoder:
    """Encode texts with an ONNX export of a sentence-transformers model (mean or CLS pooling)."""

    def __init__(self, model: str, cache_dir: Path, *, threads: int | None = None, batch_size: int = 8) -> None:
        base, variant = split_variant(model)
        if variant == "torch":
            raise ModelError(f"{model!r} names the sentence-transformers runtime, not ONNX Runtime")
        self.model_id, load_from = resolve_model(base)
        self.quantized = variant == QUANTIZED
        if self.quantized:
            self.model_id = f"{self.model_id}#{QUANTIZED}"
        self._path = Path(load_from)
        if not self._path.is_dir():
            raise ModelError(f"model {model!r} is not a local directory; ONNX export needs its files")
        self._pooling = _pooling(self._path)
        if not (self._path / "tokenizer.json").is_file():
            raise ModelError(f"{self._path} has no tokenizer.json (a fast tokenizer); use the torch encoder")
        st_config = self._path / "sentence_bert_config.json"
        self.max_length = int(json.loads(st_config.read_text()).get("max_seq_length", 512)) if st_config.is_file() else 512
        self.max_tokens = self.max_length - SPECIAL_TOKENS
        self.batch_size = batch_size
        digest = hashlib.sha256(f"{self.model_id.removesuffix('#' + QUANTIZED)}\0{self._path}".encode()).hexdigest()[:16]
        self._fp32_path = cache_dir / "onnx" / digest / "model.onnx"
        self.onnx_path = self._fp32_path.with_name("model-int8.onnx") if self.quantized else self._fp32_path
        self._threads = threads
        self._session_lock = threading.Lock()
        self._session_obj: Any = None
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(self._path / "tokenizer.json"))
        self._tokenizer.enable_truncation(self.max_length)
        self._tokenizer.enable_padding()
        self._pad_id = int((self._tokenizer.padding or {}).get("pad_id", 0))
        self._tokenizer.no_padding()
        config = json.loads((self._path / "config.json").read_text()) if (self._path / "config.json").is_file() else {}
        # the pooled vector has the transformer's width (only pooling and normalization follow it)
        self.dim = int(config.get("hidden_size") or self.embed(["dimension probe"]).shape[1])

    def load(self) -> "OnnxEncoder":
        """Export and open the model now rather than on first use (raises what either raises)."""
        self._session()
        return self

    def _session(self) -> Any:
        """The ONNX Runtime session, made on first use: exported (and quantized) once into the cache,
        so that a process that only counts tokens never pays for it."""
        with self._session_lock:
            if self._session_obj is None:
                with _EXPORT_LOCK:
                    if not self._fp32_path.is_file():
                        self._fp32_path.parent.mkdir(parents=True, exist_ok=True)
                        logger.info("exporting %s to ONNX at %s", self.model_id, self._fp32_path)
                        export_onnx(self._path, self._fp32_path)
                    if self.quantized and not self.onnx_path.is_file():
                        quantize_int8(self._fp32_path, self.onnx_path)
                import onnxruntime as ort

                options = ort.SessionOptions()
                if self._threads:
                    options.intra_op_num_threads = self._threads
                self._session_obj = ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
            return self._session_obj

    def token_counter(self) -> HFTokenCounter:
        return HFTokenCounter(self._path / "tokenizer.json", self.model_id)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of ``texts``, in order.

        Texts are encoded in batches of similar length (sorted by token count), so a batch pads to
        little more than its own texts: with a fixed order one long text makes every short text of
        its batch pay for its length. On the 2-core reference machine, 32 Cranfield queries took
        252 ms as one batch, 168 ms sorted into batches of 8, 220 ms one by one.
        """
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        session = self._session()
        encoded = self._tokenizer.encode_batch(list(texts))
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
        out = np.zeros((len(texts), 0), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(encoded[i].ids) for i in rows)
            ids = np.full((len(rows), width), self._pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            types = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                n = len(encoded[i].ids)
                ids[r, :n] = encoded[i].ids
                mask[r, :n] = 1
                types[r, :n] = encoded[i].type_ids
            tokens = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
            if self._pooling == "mean":
                pooled = (tokens * mask[..., None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1)
            else:
                pooled = tokens[:, 0]
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            if out.shape[1] == 0:
                out = np.zeros((len(texts), pooled.shape[1]), dtype=np.float32)
            out[rows] = pooled
        return out
