"""Model identity: which weights a model name or path stands for (revision, fingerprint) and how its
texts are prefixed. Feeds the model ids that key the embedding cache and the model lock.

A model id must change whenever the weights do, or a silently updated model would pass the lock and
its vectors would mix with cached ones of the old weights:

- a hub name (``org/name``, or ``org/name@REV`` for a branch, tag or commit) is resolved in the local
  Hugging Face cache to the snapshot that ``refs/main`` (or REV) names, and its id carries the commit:
  ``org/name@<40-hex commit>``; the snapshot directory is what gets loaded, so the commit in the id
  is the one whose files embed;
- a local directory's id is ``local:NAME@<12 hex of its fingerprint>``;
- the bundled default keeps its plain id while its files are those ragpipe pins
  (``BUNDLED_FINGERPRINT``); other files under that name get ``@<12 hex of their fingerprint>``.

A *fingerprint* is the SHA-256 over the relative path and SHA-256 of every file the model is loaded
from: configuration, tokenizer and weights (not hidden files, ``*.md``, or other runtimes' exports
under ``onnx/`` and ``openvino/``). Hashing the bundled 90 MB model takes 0.13–0.27 s on a shared 2-core
machine, so each file's hash is kept in ``RAGPIPE_HOME/cache/fingerprints.json`` by path,
size, mtime and inode (git's index does the same); a file written less than two seconds ago is
hashed afresh every time, because a later write of the same size could still share its mtime.

Everything here is the standard library: a base install names models the way indexing does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from registry import RegistryConfig
from retrieval.errors import ModelError

HUB_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SKIPPED_DIRS = {"onnx", "openvino"}  # exports for other runtimes: ragpipe loads neither
_RACY_SECONDS = 2.0
_memo: dict[str, list[object]] = {}  # this process's hashes, also when the cache file cannot be written
_memo_lock = threading.Lock()


@dataclass(frozen=True)
class HubSnapshot:
    """A model's snapshot in the Hugging Face cache."""

    repo: str
    commit: str
    path: Path

    @property
    def model_id(self) -> str:
        return f"{self.repo}@{self.commit}"


def parse_hub_name(model: str) -> tuple[str, str | None] | None:
    """(repo, revision or None) when ``model`` reads as a hub name and is not an existing path."""
    match = HUB_NAME.match(model)
    if match is None or Path(model).exists():
        return None
    return match["repo"], match["rev"]


def hub_cache() -> Path:
    """The Hugging Face hub cache, located the way huggingface_hub locates it."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def cached_snapshot(repo: str, revision: str | None = None) -> HubSnapshot | None:
    """The snapshot ``revision`` (default ``main``) of ``repo`` in the local cache, or None."""
    root = hub_cache() / f"models--{repo.replace('/', '--')}"
    revision = revision or "main"
    commit = revision if COMMIT.match(revision) else None
    if commit is None:
        ref = root / "refs" / revision
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    path = root / "snapshots" / commit
    return HubSnapshot(repo, commit, path) if path.is_dir() else None


def fingerprint(directory: Path, cache_file: Path | None = None) -> str:
    """The SHA-256 fingerprint of the files a model is loaded from (see the module docstring)."""
    directory = Path(directory)
    cache_file = cache_file or RegistryConfig.from_env().home / "cache" / "fingerprints.json"
    stored = _read_cache(cache_file)
    listing = []
    changed = False
    for path in sorted(_model_files(directory)):
        rel = path.relative_to(directory).as_posix()
        digest, fresh = _file_sha256(path, stored)
        changed |= fresh
        listing.append(f"{rel}\0{digest}\n")
    if changed:
        _write_cache(cache_file, stored)
    if not listing:
        raise ModelError(f"model directory {directory} holds no model files")
    return hashlib.sha256("".join(listing).encode()).hexdigest()


def _model_files(directory: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(directory, followlinks=True):  # hub snapshots are symlinks to blobs
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (Path(root) == directory and d in _SKIPPED_DIRS)]
        out.extend(Path(root) / f for f in files if not f.startswith(".") and not f.lower().endswith(".md"))
    return out


def _file_sha256(path: Path, stored: dict[str, list[object]]) -> tuple[str, bool]:
    """(hex digest, whether ``stored`` gained an entry); a hash is reused while the file's size,
    mtime and inode are those it was computed for, and its mtime is old enough to tell."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key: list[object] = [st.st_size, st.st_mtime_ns, st.st_ino]
    trusted = time.time() - st.st_mtime > _RACY_SECONDS
    with _memo_lock:
        entry = _memo.get(real) or stored.get(real)
    if trusted and isinstance(entry, list) and entry[:3] == key:
        return str(entry[3]), False
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    digest = h.hexdigest()
    if not trusted:
        return digest, False
    with _memo_lock:
        _memo[real] = stored[real] = [*key, digest]
    return digest, True


def _read_cache(cache_file: Path) -> dict[str, list[object]]:
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache_file: Path, stored: dict[str, list[object]]) -> None:
    """Best effort: a read-only home only costs hashing again next time."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        partial.write_text(json.dumps(stored, sort_keys=True))
        partial.replace(cache_file)
    except OSError:
        pass


# -- prefixes ------------------------------------------------------------------------------------

BGE_EN_QUERY = "Represent this sentence for searching relevant passages: "
BGE_ZH_QUERY = "为这个句子生成表示以用于检索相关文章："
NO_PREFIX = "none"  # what RAGPIPE_QUERY_PREFIX / RAGPIPE_PASSAGE_PREFIX say for an explicit empty prefix


@dataclass(frozen=True)
class Prefixes:
    """What an instruction-tuned model wants before each query and each passage it embeds."""

    query: str = ""
    passage: str = ""

    def __bool__(self) -> bool:
        return bool(self.query or self.passage)


def family_prefixes(name: str) -> Prefixes:
    """The published prefixes of a model family, by the model's name (its last path component).

    e5 (``intfloat/e5-*``, ``multilingual-e5-*``): ``query: `` and ``passage: ``; the instruct
    variants want a task instruction instead, which only the user can write, so they get none.
    bge English and Chinese (``BAAI/bge-*-en*``, ``-zh``): the query instruction of the model card
    and no passage prefix; bge-m3 and others need none.
    """
    base = name.rstrip("/").rsplit("/", 1)[-1].lower()
    if re.search(r"(^|[-_])e5([-_]|$)", base) and not re.search(r"instruct|mistral", base):
        return Prefixes("query: ", "passage: ")
    if base.startswith("bge-") or "-bge-" in base:
        if re.search(r"-en([-_.]|$)", base):
            return Prefixes(BGE_EN_QUERY, "")
        if re.search(r"-zh([-_.]|$)", base):
            return Prefixes(BGE_ZH_QUERY, "")
    return Prefixes()


def model_prompts(directory: Path | None) -> Prefixes | None:
    """The prefixes a sentence-transformers model declares (``prompts`` in
    ``config_sentence_transformers.json``: ``query``, and ``passage`` or ``document``), or None."""
    if directory is None or not (directory / "config_sentence_transformers.json").is_file():
        return None
    try:
        prompts = json.loads((directory / "config_sentence_transformers.json").read_text()).get("prompts") or {}
    except ValueError:
        return None
    if not isinstance(prompts, dict) or not prompts:
        return None
    passage = prompts.get("passage", prompts.get("document", ""))
    return Prefixes(str(prompts.get("query", "")), str(passage))


def resolve_prefixes(name: str, directory: Path | None, query: str | None, passage: str | None) -> Prefixes:
    """The prefixes to use: the configured ones (None: not configured; ``"none"``: explicitly empty),
    else those the model's own configuration declares, else its family's."""
    default = model_prompts(directory) or family_prefixes(name)

    def pick(configured: str | None, fallback: str) -> str:
        if configured is None:
            return fallback
        return "" if configured == NO_PREFIX else configured

    return Prefixes(pick(query, default.query), pick(passage, default.passage))
