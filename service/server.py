"""Running the app under uvicorn: one process, or ``workers`` processes that each build the app from
the environment (each loads the served versions and has its own metrics and request memory)."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, fields

from registry.extras import require
from service.config import Limits, ServeConfig

logger = logging.getLogger(__name__)


def config_environment(config: ServeConfig) -> dict[str, str]:
    """The ``RAGPIPE_*`` variables from which :meth:`ServeConfig.from_env` rebuilds ``config`` in a worker."""
    env: dict[str, str] = {}
    for f in fields(ServeConfig):
        value = getattr(config, f.name)
        if f.name in ("limits", "registry") or value is None:
            continue
        env[f"RAGPIPE_SERVE_{f.name.upper()}"] = ",".join(value) if isinstance(value, tuple) else str(value)
    for name, value in asdict(config.limits).items():
        env[f"RAGPIPE_SERVE_{name.upper()}"] = str(value)
    if config.registry.database_url:
        env["RAGPIPE_DATABASE_URL"] = config.registry.database_url
    env["RAGPIPE_HOME"] = str(config.registry.home)
    return env


def app_from_environment():  # type: ignore[no-untyped-def]
    """uvicorn's factory in each worker process."""
    from service.app import create_app

    return create_app(ServeConfig.from_env())


def serve(config: ServeConfig) -> None:
    """Serve until interrupted (SIGINT/SIGTERM: in-flight requests finish, then the aliases close)."""
    uvicorn = require("uvicorn", "serve", "ragpipe serve")
    logger.info("serving %s on http://%s:%d", ", ".join(config.indexes) or "every alias", config.host, config.port)
    if config.workers > 1:
        os.environ.update(config_environment(config))
        uvicorn.run("service.server:app_from_environment", factory=True, host=config.host, port=config.port,
                    workers=config.workers, log_level="warning", access_log=False)
        return
    from service.app import create_app

    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning", access_log=False)


__all__ = ["Limits", "app_from_environment", "config_environment", "serve"]
