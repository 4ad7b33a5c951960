"""Extraction under limits: documents are extracted in a child process with a memory cap and a deadline.

A PDF, DOCX or HTML file can make its parser hang or allocate without bound (a content stream of
millions of operators, a compressed stream that inflates to gigabytes). Discovery therefore hands
each such document to a worker process (``python -m pipeline.formats.isolation``) that caps its
own address space with ``RLIMIT_AS`` before it imports any parser, and waits for the answer at most
``timeout_s`` seconds. A worker that runs out of time is killed; one that dies (PDFium aborts when an
allocation fails under the cap) is reaped; either way the document is skipped with the reason and
the next document gets a fresh worker. The worker is reused while it stays healthy, so a directory
of PDFs pays for one interpreter start, not one per file.

Protocol (no pickle): the parent writes one JSON header line ``{"format", "size",
"max_unzipped_bytes"}`` followed by ``size`` raw bytes; the worker answers with one JSON line,
``{"extracted": {...}}`` or ``{"skip": reason}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pipeline.formats.extracted import Extracted, Layout

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MEMORY_MB = 1024
DEFAULT_MAX_UNZIPPED_BYTES = 100 * 1024 * 1024
STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ExtractLimits:
    """What one document's extraction may cost.

    Attributes:
        timeout_s: wall-clock seconds for one document (``RAGPIPE_EXTRACT_TIMEOUT``).
        memory_mb: the worker's address-space cap in MiB (``RAGPIPE_EXTRACT_MEMORY_MB``).
        max_unzipped_bytes: the most a DOCX's zip members may expand to (``RAGPIPE_MAX_UNZIPPED_BYTES``).
    """

    timeout_s: float = DEFAULT_TIMEOUT_S
    memory_mb: int = DEFAULT_MEMORY_MB
    max_unzipped_bytes: int = DEFAULT_MAX_UNZIPPED_BYTES


def extracted_to_json(extracted: Extracted) -> dict[str, Any]:
    return {"text": extracted.text, "title": extracted.title, "layout": extracted.layout.to_json(),
            "extractor": extracted.extractor}


def extracted_from_json(data: dict[str, Any]) -> Extracted:
    return Extracted(data["text"], data["title"], Layout.from_json(data["layout"]) or Layout(), data["extractor"])


class IsolatedExtractor:
    """Extract documents in a limited worker process; see the module docstring. Not thread-safe."""

    def __init__(self, limits: ExtractLimits = ExtractLimits()) -> None:
        self.limits = limits
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    def __enter__(self) -> "IsolatedExtractor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extract(self, fmt: str, data: bytes) -> Extracted | str:
        """The extracted document, or the reason it is skipped."""
        proc = self._worker()
        assert proc.stdin is not None and proc.stdout is not None
        header = {"format": fmt, "size": len(data), "max_unzipped_bytes": self.limits.max_unzipped_bytes}
        deadline = time.monotonic() + self.limits.timeout_s
        try:
            proc.stdin.write(json.dumps(header).encode() + b"\n")
            proc.stdin.write(data)
            proc.stdin.flush()
        except BrokenPipeError:
            return self._died()
        line = self._read_line(proc.stdout.fileno(), deadline)
        if line is None:
            self._kill()
            return (f"extraction took longer than the {self.limits.timeout_s:g}-second limit "
                    "(RAGPIPE_EXTRACT_TIMEOUT); the extractor was stopped")
        if not line:
            return self._died()
        answer = json.loads(line)
        if "skip" in answer:
            return str(answer["skip"])
        return extracted_from_json(answer["extracted"])

    def close(self) -> None:
        if self._proc is not None:
            proc, self._proc = self._proc, None
            try:
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            for pipe in (proc.stdout,):
                if pipe is not None:
                    pipe.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _worker(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self.close()
        # the worker runs this very code: the directory holding the pipeline package goes first
        code_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([code_root, *filter(None, [env.get("PYTHONPATH")])])
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.formats.isolation", str(self.limits.memory_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env, close_fds=True,
        )
        # the interpreter's start and the parsers' import do not count against a document's time
        assert self._proc.stdout is not None
        ready = self._read_line(self._proc.stdout.fileno(), time.monotonic() + STARTUP_TIMEOUT_S)
        if not ready:
            self._kill()
            raise RuntimeError(f"the extraction worker did not start within {STARTUP_TIMEOUT_S:g} s")
        return self._proc

    def _read_line(self, fd: int, deadline: float) -> bytes | None:
        """One line from the worker; None when the deadline passed, b"" when the worker closed its end."""
        chunks: list[bytes] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b""
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                return b"".join(chunks)

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        self.close()

    def _died(self) -> str:
        proc = self._proc
        assert proc is not None
        code = proc.wait()
        tail = b""
        if self._stderr is not None:
            self._stderr.seek(0, os.SEEK_END)
            self._stderr.seek(max(0, self._stderr.tell() - 400))
            tail = self._stderr.read()
        self.close()
        if tail.strip():
            logger.warning("extractor worker died (exit %s): %s", code, tail.decode(errors="replace").strip())
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        return (f"the extractor process died ({how}): the document needs more than the {self.limits.memory_mb} MiB "
                "memory limit (RAGPIPE_EXTRACT_MEMORY_MB) or crashes the extractor")


def _serve(memory_mb: int) -> None:
    """The worker: cap the address space, then answer requests until stdin closes."""
    import resource

    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # answers go to a private copy of stdout; a library that prints writes to stderr instead
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    from pipeline.formats import EXTRACTED_FORMATS, extract_document, extractor_version
    from pipeline.formats.extracted import Unextractable

    for fmt in set(EXTRACTED_FORMATS.values()):  # import the parsers now, before any document's clock runs
        with contextlib.suppress(Exception):
            extract_document(fmt, b"")
            extractor_version(fmt)
    out.write(b'{"ready": true}\n')
    out.flush()

    while True:
        line = requests.readline()
        if not line:
            return
        header = json.loads(line)
        data = requests.read(int(header["size"]))
        try:
            extracted = extract_document(header["format"], data, max_unzipped_bytes=int(header["max_unzipped_bytes"]))
            answer: dict[str, Any] = {"extracted": extracted_to_json(extracted)}
        except Unextractable as exc:
            answer = {"skip": str(exc)}
        except MemoryError:
            answer = {"skip": f"extraction needs more than the {memory_mb} MiB memory limit (RAGPIPE_EXTRACT_MEMORY_MB)"}
        except Exception as exc:  # a parser's own error on a malformed file: the file is damaged
            answer = {"skip": f"damaged {header['format'].upper()} file: {type(exc).__name__}: {str(exc)[:200]}"}
        out.write(json.dumps(answer).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
