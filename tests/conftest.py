"""Shared fixtures: a real PostgreSQL per test (cloned from a migrated template) and small corpora."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from psycopg import conninfo, sql

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from registry import Registry, RegistryConfig  # noqa: E402
from registry import db as registry_db  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The server RAGPIPE_DATABASE_URL names, else an embedded server for this session."""
    url = os.environ.get("RAGPIPE_DATABASE_URL")
    if url:
        return url
    home = tmp_path_factory.mktemp("pg")
    return registry_db.resolve_database_url(None, home)


def _admin(url: str):  # type: ignore[no-untyped-def]
    return registry_db.connect(url, autocommit=True)


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    """A database with every migration applied, cloned by each test."""
    name = f"ragpipe_tpl_{os.getpid()}"
    with _admin(server_url) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with registry_db.connect(conninfo.make_conninfo(server_url, dbname=name), autocommit=True) as conn:
        registry_db.upgrade(conn)
    yield name
    with _admin(server_url) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def database_url(server_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database of this test's own."""
    name = f"ragpipe_t_{uuid.uuid4().hex[:12]}"
    with _admin(server_url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template_db)))
    yield conninfo.make_conninfo(server_url, dbname=name)
    with _admin(server_url) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def empty_database_url(server_url: str) -> Iterator[str]:
    """A database with no schema at all."""
    name = f"ragpipe_e_{uuid.uuid4().hex[:12]}"
    with _admin(server_url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield conninfo.make_conninfo(server_url, dbname=name)
    with _admin(server_url) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def registry_config(database_url: str, tmp_path: Path) -> RegistryConfig:
    return RegistryConfig(database_url=database_url, home=tmp_path / "home")


@pytest.fixture
def registry(registry_config: RegistryConfig) -> Iterator[Registry]:
    with Registry.open(registry_config, migrate=False) as reg:
        yield reg


@pytest.fixture(scope="session")
def embedder():  # type: ignore[no-untyped-def]
    """Hash-derived vectors with the real model's tokenizer: real chunking, instant embedding."""
    from pipeline.deterministic import DeterministicEmbedder

    return DeterministicEmbedder()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API: moto's standalone server on a free loopback port, for the whole session."""
    from moto.server import ThreadedMotoServer

    from s3server import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared reference data (RAGPIPE_SHARED_DATA, else ../shared/data); skips when absent."""
    path = Path(os.environ.get("RAGPIPE_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not (path / "peps-replay" / "base.jsonl").is_file():
        pytest.skip(f"shared reference data not found at {path} (set RAGPIPE_SHARED_DATA)")
    return path


def write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    """Create files under root from a {relative path: content} dict."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


def run_threads(target: Callable[..., object], args: Sequence[tuple[object, ...]]) -> list[Exception]:
    """Run ``target(*a)`` in one thread per ``a`` in ``args``, all started before any is joined; return
    what the threads raised (a thread's exception is otherwise only printed)."""
    errors: list[Exception] = []

    def guarded(*a: object) -> None:
        try:
            target(*a)
        except Exception as exc:  # reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
