"""The HTTP search service (``ragpipe serve``): a thin FastAPI shell over the retrieval library.

    from service import create_app, serve

Needs the ``[serve]`` extra. Imports ``retrieval`` and ``registry``, never ``pipeline``; nothing is
imported or opened until :func:`create_app` or :func:`serve` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ServeConfig", "create_app", "serve"]

if TYPE_CHECKING:
    from service.app import create_app
    from service.config import ServeConfig
    from service.server import serve


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from service.app import create_app

        return create_app
    if name == "ServeConfig":
        from service.config import ServeConfig

        return ServeConfig
    if name == "serve":
        from service.server import serve

        return serve
    raise AttributeError(name)
