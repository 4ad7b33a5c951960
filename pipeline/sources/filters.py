"""Discovery's selection: which names of a source are documents (include/exclude globs, size limit).

One filter for every source that has names: a directory walk prunes excluded directories as it
goes; an object store's flat listing asks the same question of each key's parent directories.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pipeline.sources.base import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, DEFAULT_MAX_BYTES, SkippedDocument


def compile_globs(patterns: Iterable[str]) -> Callable[[str], bool]:
    """One regular expression for a list of globs (``*`` also crosses ``/``)."""
    patterns = tuple(patterns)
    if not patterns:
        return lambda rel: False
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    return lambda rel: regex.match(rel) is not None


@dataclass(frozen=True)
class SourceFilter:
    """The include and exclude globs over relative posix paths, and the most bytes a document may have."""

    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    max_bytes: int = DEFAULT_MAX_BYTES
    wanted: Callable[[str], bool] = field(init=False, repr=False, compare=False)
    excluded: Callable[[str], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "wanted", compile_globs(self.include))
        object.__setattr__(self, "excluded", compile_globs(self.exclude))

    def selects(self, rel: str) -> bool:
        """Whether a file at ``rel`` is a document: included, and neither it nor a directory above
        it excluded (what a walk that prunes excluded directories would find)."""
        parts = rel.split("/")
        if any(self.excluded("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            return False
        return self.wanted(rel)

    def too_large(self, rel: str, size: int) -> SkippedDocument | None:
        """The skip of a document over the size limit, or None."""
        if size > self.max_bytes:
            return SkippedDocument(rel, f"larger than the {self.max_bytes}-byte limit ({size} bytes)")
        return None
