"""Optional dependencies: the one door through which ragpipe's modules reach a package of an extra.

The base install (``pip install ragpipe``) is the retrieval library and the registry client. A
feature that needs more (indexing needs ``[pipeline]``: torch, sentence-transformers, the bundled
model; the cross-encoder reranker too; the embedded PostgreSQL needs ``[embedded]``) loads its
package through :func:`require`, which turns a
missing package into :class:`MissingExtra` naming the extra to install, never an ImportError
traceback. ``tests/test_layering.py`` checks that base modules import no extra's package in any
other way, and that every ``require`` names the extra that really provides the package.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from registry.errors import MissingExtra


def install_hint(extra: str) -> str:
    return f'pip install "ragpipe[{extra}]"'


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` (a package of the ``extra`` extra) for ``feature``.

    Raises:
        MissingExtra: the module is not installed; the message says what to install.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module
        raise MissingExtra(
            f"{feature} needs the {missing!r} package, which this installation lacks: {install_hint(extra)}"
        ) from exc
