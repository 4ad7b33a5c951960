"""A small client of Airflow 3's public REST API (``/api/v2``), with the simple auth manager's JWT.

``POST /auth/token`` trades the admin's name and password for a bearer token; every other call sends
it. Only what the cluster needs: health, a DAG's state, unpausing, triggering a run, its task
instances and their tries.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote


class ApiError(RuntimeError):
    """The API answered with an error status; the message has the method, path and status (never the token)."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:300]}")
        self.status = status


@dataclass(frozen=True)
class TaskTry:
    """One attempt of one task instance: which worker ran it and how it ended."""

    task_id: str
    map_index: int
    try_number: int
    state: str | None
    hostname: str
    duration: float | None

    @property
    def label(self) -> str:
        return self.task_id if self.map_index < 0 else f"{self.task_id}[{self.map_index}]"


class AirflowClient:
    """The REST API of the api-server at ``base_url``, as ``username``."""

    def __init__(self, base_url: str, username: str, password: str, *, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._credentials = {"username": username, "password": password}
        self._token: str | None = None
        self.timeout_s = timeout_s

    def _request(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 401 and auth and self._token is not None:  # expired: one new token, one retry
                self._token = None
                return self._request(method, path, body, auth=auth)
            raise ApiError(method, path, exc.code, exc.read().decode(errors="replace")) from None
        return json.loads(raw) if raw else None

    def token(self) -> str:
        if self._token is None:
            answer = self._request("POST", "/auth/token", self._credentials, auth=False)
            self._token = str(answer["access_token"])
        return self._token

    def health(self) -> dict[str, Any]:
        """``/api/v2/monitor/health``: the metadatabase's, scheduler's, triggerer's and dag-processor's status."""
        return dict(self._request("GET", "/api/v2/monitor/health", auth=False))

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        try:
            return dict(self._request("GET", f"/api/v2/dags/{quote(dag_id)}"))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def unpause(self, dag_id: str) -> None:
        self._request("PATCH", f"/api/v2/dags/{quote(dag_id)}", {"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any], run_id: str | None = None) -> str:
        body: dict[str, Any] = {"logical_date": None, "conf": conf}
        if run_id:
            body["dag_run_id"] = run_id
        return str(self._request("POST", f"/api/v2/dags/{quote(dag_id)}/dagRuns", body)["dag_run_id"])

    def run_state(self, dag_id: str, run_id: str) -> str:
        return str(self._request("GET", f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}")["state"])

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        path = f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances?limit=1000"
        return list(self._request("GET", path)["task_instances"])

    def tries(self, dag_id: str, run_id: str) -> list[TaskTry]:
        """Every attempt of every task instance of the run, earlier tries of retried tasks included."""
        out = []
        for ti in self.task_instances(dag_id, run_id):
            if int(ti.get("try_number") or 0) > 1:
                map_part = "" if int(ti["map_index"]) < 0 else f"/{ti['map_index']}"
                path = (f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/"
                        f"{quote(ti['task_id'])}{map_part}/tries")
                attempts = self._request("GET", path)["task_instances"]
            else:
                attempts = [ti]
            out.extend(TaskTry(a["task_id"], int(a["map_index"]), int(a.get("try_number") or 0), a.get("state"),
                               a.get("hostname") or "", a.get("duration")) for a in attempts)
        return sorted(out, key=lambda t: (t.task_id, t.map_index, t.try_number))

    def wait_for_run(self, dag_id: str, run_id: str, *, timeout_s: float, poll_s: float = 2.0) -> str:
        """Poll until the run ends; its final state (``success`` or ``failed``), or the last one seen."""
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            try:
                state = self.run_state(dag_id, run_id)
            except (OSError, ApiError):  # the api-server restarting: ask again
                pass
            if state in ("success", "failed"):
                return state
            time.sleep(poll_s)
        return state
