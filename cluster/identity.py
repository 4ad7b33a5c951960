"""The name a cluster process reports to Airflow (``[core] hostname_callable``).

The local cluster runs every worker on one machine, so the machine's name would not say which
worker ran a task: each process reports the name the cluster gave it (``RAGPIPE_PROCESS_NAME``).
"""

from __future__ import annotations

import os
import socket


def process_name() -> str:
    """The cluster's name for this process, else the machine's fully qualified name."""
    return os.environ.get("RAGPIPE_PROCESS_NAME") or socket.getfqdn()
