"""Object-store credentials: from the standard AWS variables or an orchestrator's connection, never logged.

The key id and the secret parts have no ``repr``; every error message about a store passes through :meth:`redact`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ObjectStoreCredentials:
    """How to reach an S3-compatible store. None fields fall back to the AWS SDK's own defaults.

    Attributes:
        access_key, secret_key, session_token: the key pair (and a temporary session's token).
        endpoint_url: another S3-compatible server (MinIO, Ceph, a test server), e.g. ``http://host:9000``.
        region: the bucket's region.
    """

    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ObjectStoreCredentials":
        """``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
        ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``AWS_REGION`` or ``AWS_DEFAULT_REGION``."""
        env = os.environ if environ is None else environ

        def get(*names: str) -> str | None:
            return next((env[n] for n in names if env.get(n)), None)

        return cls(
            access_key=get("AWS_ACCESS_KEY_ID"),
            secret_key=get("AWS_SECRET_ACCESS_KEY"),
            session_token=get("AWS_SESSION_TOKEN"),
            endpoint_url=get("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            region=get("AWS_REGION", "AWS_DEFAULT_REGION"),
        )

    def redact(self, text: str) -> str:
        """``text`` with every credential (the key id too) replaced by ``***``."""
        for secret in (self.secret_key, self.session_token, self.access_key):
            if secret:
                text = text.replace(secret, "***")
        return text
