"""Encoder bundles: a model's ONNX export made once (torch), run for documents, stored for queries.

``OnnxModelEncoder`` is the CPU document embedder: it exports the model's transformer with
``torch.onnx`` into the ragpipe cache as an encoder bundle (see :mod:`retrieval.onnx`) on first use
and runs it with onnxruntime; tokenization, pooling and normalization follow the model's
sentence-transformers configuration, so the vectors equal sentence-transformers' and the model id
is the same. ``store_encoder`` puts a bundle into the artifact store once per content digest, so
that every version records which encoder its queries must use and retrievers with only the base
install (no torch) can load it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.artifacts import ArtifactStore, writing_file
from retrieval.errors import ModelError
from registry.extras import require
from retrieval.identity import Prefixes
from retrieval.models import QUANTIZED, SPECIAL_TOKENS, HFTokenCounter, identify_model, split_variant
from retrieval.onnx import (
    BUNDLE_FILES,
    ENCODERS_DIR,
    ONNX_FILE,
    SPEC_FILE,
    TOKENIZER_FILE,
    EncoderRef,
    EncoderSpec,
    OnnxEncoder,
    describe_bundle,
)

logger = logging.getLogger(__name__)
_EXPORT_LOCK = threading.Lock()

_SUPPORTED_MODULES = {
    "sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
}


def model_pooling(model_path: Path) -> str:
    """The pooling of a sentence-transformers model directory, if ONNX Runtime can run it as is."""
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
    torch = require("torch", "pipeline", "exporting the model to ONNX")
    transformers = require("transformers", "pipeline", "exporting the model to ONNX")

    model = transformers.AutoModel.from_pretrained(str(model_path)).eval()

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
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
    quantization = require("onnxruntime.quantization", "pipeline", "quantizing the ONNX export")

    partial = target.with_name(target.name + f".{os.getpid()}.tmp")
    quantization.quantize_dynamic(str(source), str(partial), per_channel=True, reduce_range=True,
                                  weight_type=quantization.QuantType.QInt8)
    partial.rename(target)


class OnnxModelEncoder:
    """A sentence-transformers model run on ONNX Runtime, exported into ``cache_dir`` on first use.

    Counting tokens needs only the model's tokenizer, so a planning step never pays for the export.
    """

    def __init__(self, model: str, cache_dir: Path, *, threads: int | None = None, batch_size: int = 8) -> None:
        base, variant = split_variant(model)
        if variant == "torch":
            raise ModelError(f"{model!r} names the sentence-transformers runtime, not ONNX Runtime")
        self._resolved = identify_model(base)
        self.model_id, load_from = self._resolved.model_id, self._resolved.path
        self.quantized = variant == QUANTIZED
        if self.quantized:
            self.model_id = f"{self.model_id}#{QUANTIZED}"
        self._path = Path(load_from)
        if not self._path.is_dir():
            raise ModelError(f"model {model!r} is not a local directory; ONNX export needs its files")
        self._pooling = model_pooling(self._path)
        if not (self._path / TOKENIZER_FILE).is_file():
            raise ModelError(f"{self._path} has no tokenizer.json (a fast tokenizer); use the torch encoder")
        st_config = self._path / "sentence_bert_config.json"
        self.max_length = int(json.loads(st_config.read_text()).get("max_seq_length", 512)) if st_config.is_file() else 512
        self.max_tokens = self.max_length - SPECIAL_TOKENS
        self.batch_size = batch_size
        self._threads = threads
        config = json.loads((self._path / "config.json").read_text()) if (self._path / "config.json").is_file() else {}
        hidden = config.get("hidden_size")
        if not isinstance(hidden, int):
            raise ModelError(f"{self._path}/config.json names no hidden_size; use the torch encoder")
        self.dim = hidden  # the pooled vector has the transformer's width
        # one cache folder per model files (id, path and fingerprint), one bundle per variant inside it
        files = f"{self.model_id.removesuffix('#' + QUANTIZED)}\0{self._path}\0{self._resolved.fingerprint}"
        digest = hashlib.sha256(files.encode()).hexdigest()[:16]
        self._export_dir = cache_dir / "onnx" / digest
        self.bundle_dir = self._export_dir / ("int8" if self.quantized else "fp32")
        self._runtime: OnnxEncoder | None = None
        self._lock = threading.Lock()

    @property
    def onnx_path(self) -> Path:
        return self.bundle_dir / ONNX_FILE

    @property
    def fingerprint(self) -> str | None:
        return self._resolved.fingerprint

    def load(self) -> "OnnxModelEncoder":
        """Export and open the model now rather than on first use (raises what either raises)."""
        self._encoder()
        return self

    def ensure_bundle(self, prefixes: Prefixes = Prefixes()) -> Path:
        """Export (and quantize) into the cache unless done before; return the bundle directory.

        A bundle for ``prefixes`` is the plain one with the prefixes in its description (the ONNX
        file hard-linked where the file system allows), so its digest differs from the plain one's.
        """
        with _EXPORT_LOCK:
            plain = self._ensure_plain_bundle()
            if not prefixes:
                return plain
            key = hashlib.sha256(f"{prefixes.query}\0{prefixes.passage}".encode()).hexdigest()[:12]
            target = plain.with_name(f"{plain.name}-prefixed-{key}")
            if all((target / name).is_file() for name in BUNDLE_FILES):
                return target
            target.mkdir(parents=True, exist_ok=True)
            for name in (ONNX_FILE, TOKENIZER_FILE):
                (target / name).unlink(missing_ok=True)
                try:
                    os.link(plain / name, target / name)
                except OSError:
                    shutil.copyfile(plain / name, target / name)
            spec = EncoderSpec.from_json((plain / SPEC_FILE).read_text())
            _write_spec(target, replace(spec, query_prefix=prefixes.query, passage_prefix=prefixes.passage))
            return target

    def _ensure_plain_bundle(self) -> Path:
        """The bundle without prefixes (call holding _EXPORT_LOCK)."""
        if all((self.bundle_dir / name).is_file() for name in BUNDLE_FILES):
            return self.bundle_dir
        fp32 = self._export_dir / "fp32"
        if not (fp32 / ONNX_FILE).is_file():
            fp32.mkdir(parents=True, exist_ok=True)
            logger.info("exporting %s to ONNX at %s", self.model_id, fp32)
            export_onnx(self._path, fp32 / ONNX_FILE)
        if self.quantized and not self.onnx_path.is_file():
            self.bundle_dir.mkdir(parents=True, exist_ok=True)
            quantize_int8(fp32 / ONNX_FILE, self.onnx_path)
        shutil.copyfile(self._path / TOKENIZER_FILE, self.bundle_dir / TOKENIZER_FILE)
        _write_spec(self.bundle_dir, EncoderSpec(model_id=self.model_id, pooling=self._pooling,
                                                 max_length=self.max_length, dim=self.dim, quantized=self.quantized))
        return self.bundle_dir

    def _encoder(self) -> OnnxEncoder:
        with self._lock:
            if self._runtime is None:
                self._runtime = OnnxEncoder(self.ensure_bundle(), threads=self._threads,
                                            batch_size=self.batch_size).load()
            return self._runtime

    def token_counter(self) -> HFTokenCounter:
        return HFTokenCounter(self._path / TOKENIZER_FILE, self.model_id)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._encoder().embed(texts)


def _write_spec(bundle_dir: Path, spec: EncoderSpec) -> None:
    partial = bundle_dir / f".{SPEC_FILE}.{os.getpid()}.tmp"
    partial.write_text(spec.to_json())
    partial.rename(bundle_dir / SPEC_FILE)  # last: a bundle with its description is complete


def encoder_bundle(embedder: Any, cache_dir: Path) -> Path | None:
    """The encoder bundle that encodes queries like ``embedder`` encodes documents, or None.

    ONNX document embedders have theirs; a sentence-transformers one gets the export of its model
    (the same vectors) when ONNX Runtime can run that model; any other embedder (the deterministic
    one of tests and benchmarks) has none, and its versions are searched with an encoder the caller
    passes. A prefixed embedder's bundle records its prefixes.
    """
    prefixes = getattr(embedder, "prefixes", Prefixes())
    embedder = getattr(embedder, "inner", embedder)  # a PrefixedEmbedder runs another embedder
    if isinstance(embedder, OnnxModelEncoder):
        return embedder.ensure_bundle(prefixes)
    from retrieval.models import SentenceTransformerEmbedder

    if isinstance(embedder, SentenceTransformerEmbedder):
        # a local model is named by its path (its id is derived from the files), others by their id
        name = embedder._load_from if embedder.model_id.startswith("local:") else embedder.model_id
        try:
            return OnnxModelEncoder(name, cache_dir).ensure_bundle(prefixes)
        except ModelError as exc:
            logger.warning("no ONNX query encoder for %s (%s): retrievers will need ragpipe[pipeline]",
                           embedder.model_id, exc)
    return None


def store_encoder(store: ArtifactStore, bundle: Path) -> EncoderRef:
    """Put a bundle into the artifact store under its digest (once: an existing one is kept)."""
    ref = describe_bundle(bundle)
    if store.is_local:
        root = Path(store.uri.removeprefix("file://"))
        target = root / ref.path
        if all((target / name).is_file() for name in ref.files):
            return ref
        (root / ENCODERS_DIR).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{ref.digest}.", dir=root / ENCODERS_DIR))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700: readers may run as another user
        try:
            for name in BUNDLE_FILES:
                with writing_file(tmp / name):  # a full disk is the run's error, named, never a crash
                    shutil.copyfile(bundle / name, tmp / name)
            try:
                tmp.rename(target)
            except OSError:  # another run stored the same bundle first: same content, keep theirs
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return ref
    from pyarrow import fs

    filesystem, base = fs.FileSystem.from_uri(f"{store.uri}/{ref.path}")
    if filesystem.get_file_info(f"{base}/{SPEC_FILE}").type == fs.FileType.File:
        return ref
    filesystem.create_dir(base, recursive=True)
    for name in [n for n in BUNDLE_FILES if n != SPEC_FILE] + [SPEC_FILE]:  # the description last
        fs.copy_files(str(bundle / name), f"{base}/{name}", destination_filesystem=filesystem)
    return ref
