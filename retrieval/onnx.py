"""The query encoder of the base install: a model's ONNX export run with onnxruntime and tokenizers.

An *encoder bundle* is a directory with the model's ONNX export (``model.onnx``), its fast tokenizer
(``tokenizer.json``) and ``encoder.json`` (model id, pooling, sequence length, dimension). Indexing
makes it from the model (``pipeline.encoders``, which needs torch) and stores it once per model in
the artifact store, content-addressed: ``ROOT/_encoders/DIGEST/``, where DIGEST is the SHA-256 of
the files' own checksums. Each version's manifest names the digest and the files' checksums
(``model.encoder``), so a retriever loads exactly the encoder the version was validated with, and
needs neither torch nor the model's original files. A test proves the vectors equal
sentence-transformers' (cosine >= 0.99999), so the model id is the same.

``MODEL#onnx-int8`` bundles hold the export quantized to int8: its vectors are not the fp32 ones,
so its model id keeps the suffix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.artifacts import sha256_file
from retrieval.errors import ModelError
from retrieval.models import SPECIAL_TOKENS, HFTokenCounter

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
SPEC_FILE = "encoder.json"
BUNDLE_FILES = (ONNX_FILE, TOKENIZER_FILE, SPEC_FILE)
ENCODERS_DIR = "_encoders"
POOLINGS = ("mean", "cls")


@dataclass(frozen=True)
class EncoderSpec:
    """How to turn the export's token embeddings into the model's sentence vectors."""

    model_id: str
    pooling: str  # "mean" or "cls"
    max_length: int  # tokens per input, special tokens included
    dim: int
    quantized: bool = False
    query_prefix: str = ""  # what every query is prefixed with before encoding (the manifest says so too)
    passage_prefix: str = ""  # what the documents were prefixed with

    def to_json(self) -> str:
        # empty prefixes are left out, so bundles of models without prefixes keep their digests
        data = {k: v for k, v in asdict(self).items() if v != "" or not k.endswith("_prefix")}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EncoderSpec":
        data = json.loads(text)
        spec = cls(model_id=str(data["model_id"]), pooling=str(data["pooling"]),
                   max_length=int(data["max_length"]), dim=int(data["dim"]), quantized=bool(data.get("quantized")),
                   query_prefix=str(data.get("query_prefix", "")), passage_prefix=str(data.get("passage_prefix", "")))
        if spec.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {spec.pooling!r}")
        return spec


@dataclass(frozen=True)
class EncoderRef:
    """What a version's manifest records of its query encoder (``model.encoder``): part of the
    model lock, checked file by file when the encoder is loaded."""

    digest: str
    files: dict[str, str]  # file name -> sha256

    @property
    def path(self) -> str:
        """Where the bundle lies, relative to the artifact store's root."""
        return f"{ENCODERS_DIR}/{self.digest}"

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "files": dict(sorted(self.files.items())), "path": self.path}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EncoderRef":
        return cls(digest=str(data["digest"]), files={str(k): str(v) for k, v in data["files"].items()})


def bundle_digest(files: dict[str, str]) -> str:
    """The content address of a bundle: SHA-256 over its files' names and checksums."""
    listing = "".join(f"{name}\0{files[name]}\n" for name in sorted(files))
    return hashlib.sha256(listing.encode()).hexdigest()


def describe_bundle(directory: Path) -> EncoderRef:
    """Checksum a bundle directory's files into the reference a manifest records."""
    missing = [name for name in BUNDLE_FILES if not (directory / name).is_file()]
    if missing:
        raise ModelError(f"encoder bundle {directory} lacks {', '.join(missing)}")
    files = {name: sha256_file(directory / name) for name in BUNDLE_FILES}
    return EncoderRef(digest=bundle_digest(files), files=files)


def verify_bundle(directory: Path, ref: EncoderRef, model_id: str) -> None:
    """Raise :class:`ModelError` unless ``directory`` holds exactly the files ``ref`` names."""
    if bundle_digest(ref.files) != ref.digest:
        raise ModelError(f"the manifest's query encoder for {model_id!r} is inconsistent (digest {ref.digest[:12]} "
                         "does not match its files); rebuild the version with `ragpipe index SOURCE --full`")
    for name, expected in sorted(ref.files.items()):
        path = directory / name
        if not path.is_file():
            raise ModelError(f"query encoder of {model_id!r}: {path} is missing; rebuild the version with "
                             "`ragpipe index SOURCE --full` (with ragpipe[pipeline] installed)")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelError(f"query encoder of {model_id!r}: {path} has checksum {actual[:12]}, the manifest "
                             f"{expected[:12]}; the stored export is corrupt or another model's")


class OnnxEncoder:
    """Encode texts with an encoder bundle (mean or CLS pooling, L2-normalized float32 vectors)."""

    def __init__(self, directory: Path, *, threads: int | None = None, batch_size: int = 8) -> None:
        self.directory = Path(directory)
        try:
            self.spec = EncoderSpec.from_json((self.directory / SPEC_FILE).read_text())
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot read the encoder description {self.directory / SPEC_FILE}: {exc}") from exc
        self.model_id = self.spec.model_id
        self.quantized = self.spec.quantized
        self.query_prefix = self.spec.query_prefix
        self.dim = self.spec.dim
        self.max_length = self.spec.max_length
        self.max_tokens = self.max_length - SPECIAL_TOKENS
        self.batch_size = batch_size
        self.onnx_path = self.directory / ONNX_FILE
        self._threads = threads
        self._session_lock = threading.Lock()
        self._session_obj: Any = None
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(self.directory / TOKENIZER_FILE))
        self._tokenizer.enable_truncation(self.max_length)
        self._tokenizer.enable_padding()
        self._pad_id = int((self._tokenizer.padding or {}).get("pad_id", 0))
        self._tokenizer.no_padding()

    @classmethod
    def from_store(cls, root_uri: str, ref: EncoderRef, model_id: str, cache_dir: Path,
                   **options: Any) -> "OnnxEncoder":
        """The bundle ``ref`` names under the artifact store ``root_uri`` (downloaded into
        ``cache_dir`` when remote), its checksums verified before it is used."""
        directory = _local_bundle(root_uri, ref, model_id, cache_dir)
        verify_bundle(directory, ref, model_id)
        encoder = cls(directory, **options)
        if encoder.model_id != model_id:
            raise ModelError(f"the stored query encoder {ref.digest[:12]} is for {encoder.model_id!r}, "
                             f"the version names {model_id!r}")
        return encoder.load()

    def load(self) -> "OnnxEncoder":
        """Open the ONNX Runtime session now rather than on first use."""
        self._session()
        return self

    def _session(self) -> Any:
        with self._session_lock:
            if self._session_obj is None:
                import onnxruntime as ort

                options = ort.SessionOptions()
                if self._threads:
                    options.intra_op_num_threads = self._threads
                try:
                    self._session_obj = ort.InferenceSession(str(self.onnx_path), options,
                                                             providers=["CPUExecutionProvider"])
                except Exception as exc:  # onnxruntime raises its own exception types
                    raise ModelError(f"cannot open the ONNX export {self.onnx_path} of {self.model_id!r}: {exc}") from exc
            return self._session_obj

    def token_counter(self) -> HFTokenCounter:
        return HFTokenCounter(self.directory / TOKENIZER_FILE, self.model_id)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of ``texts``, in order.

        Texts are encoded in batches of similar length (sorted by token count), so a batch pads to
        little more than its own texts: with a fixed order one long text makes every short text of
        its batch pay for its length. On the 2-core reference machine, 32 Cranfield queries took
        252 ms as one batch, 168 ms sorted into batches of 8, 220 ms one by one.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        session = self._session()
        encoded = self._tokenizer.encode_batch(list(texts))
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
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
            if self.spec.pooling == "mean":
                pooled = (tokens * mask[..., None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1)
            else:
                pooled = tokens[:, 0]
            if pooled.shape[1] != self.dim:
                raise ModelError(f"the ONNX export of {self.model_id!r} gives {pooled.shape[1]} dimensions, "
                                 f"its description {self.dim}")
            out[rows] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out


def _local_bundle(root_uri: str, ref: EncoderRef, model_id: str, cache_dir: Path) -> Path:
    """A local directory with the bundle's files: under the store itself, or a downloaded copy."""
    if "://" not in root_uri or root_uri.startswith("file://"):
        return Path(root_uri.removeprefix("file://")) / ref.path
    target = cache_dir / ENCODERS_DIR / ref.digest
    if all((target / name).is_file() for name in ref.files):
        return target
    from pyarrow import fs

    partial = target.with_name(f".{ref.digest}.download")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        filesystem, base = fs.FileSystem.from_uri(f"{root_uri.rstrip('/')}/{ref.path}")
        for name in sorted(ref.files):
            fs.copy_files(f"{base}/{name}", str(partial / name), source_filesystem=filesystem)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise ModelError(f"cannot download the query encoder of {model_id!r} from {root_uri}/{ref.path}: {exc}") from exc
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target
