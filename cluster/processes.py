"""The cluster's processes: each started with its own log file, pid file and working directory, found
again by the tag every one of them (and everything they start) carries in its environment.

A process's pid file names the process the cluster started; its working directory (one per
component, inherited by everything it starts) with the tag ``RAGPIPE_CLUSTER_ID`` also finds what it
started itself (api-server workers, Celery pool processes, the task processes Airflow puts in
process groups of their own, orphans of a killed parent), so stopping a component stops all of it
and nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from cluster.settings import ClusterSettings

_INHERITED_PREFIXES = ("RAGPIPE_", "AIRFLOW", "AWS_", "PYTHONPATH")
_children: dict[int, subprocess.Popen[bytes]] = {}  # started by this process: reaped when they end


class ClusterError(RuntimeError):
    """A cluster process failed to start or to become healthy; the message names it and its log."""


def base_environment() -> dict[str, str]:
    """This process's environment without the settings the cluster sets itself."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES)}


def start(settings: ClusterSettings, name: str, argv: list[str], *, extra_env: dict[str, str] | None = None) -> int:
    """Start ``argv`` as the cluster process ``name`` in a session of its own; return its pid."""
    workdir = settings.workdir(name)
    for path in (workdir, settings.pid_file(name).parent, settings.log_file(name).parent):
        path.mkdir(parents=True, exist_ok=True)
    env = {**base_environment(), **settings.environment(name), **(extra_env or {})}
    with open(settings.log_file(name), "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} start {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _children[proc.pid] = proc
    settings.pid_file(name).write_text(f"{proc.pid}\n")
    return proc.pid


def main_pid(settings: ClusterSettings, name: str) -> int | None:
    try:
        return int(settings.pid_file(name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _reap() -> None:
    for pid, proc in list(_children.items()):
        if proc.poll() is not None:
            del _children[pid]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def is_running(settings: ClusterSettings, name: str) -> bool:
    """Whether the process the pid file of ``name`` names is alive and still the cluster's."""
    _reap()
    pid = main_pid(settings, name)
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return False
    return _alive(proc) and _component(settings, proc) == name


def _component(settings: ClusterSettings, proc: psutil.Process) -> str | None:
    """The cluster component ``proc`` belongs to, or None when it is not the cluster's.

    A process belongs when its working directory is a component's (every process the cluster
    starts runs there, and so do all they start) and its environment carries the cluster's tag, or
    none at all: Airflow's processes set their titles with setproctitle, which overwrites the memory
    /proc/PID/environ shows.
    """
    try:
        cwd = Path(proc.cwd())
        env = proc.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return None
    if env and env.get("RAGPIPE_CLUSTER_ID") != settings.cluster_id:
        return None
    if cwd.parent.parent != settings.root or cwd.parent.name not in ("control", "workers"):
        return None
    return cwd.name


def tagged(settings: ClusterSettings, name: str | None = None) -> list[psutil.Process]:
    """Every live process of the cluster (of its component ``name`` only, when given)."""
    _reap()
    found = []
    for proc in psutil.process_iter():
        component = _component(settings, proc)
        if component is None or (name is not None and component != name):
            continue
        if _alive(proc):
            found.append(proc)
    return found


def kill(settings: ClusterSettings, name: str, sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` to every process of component ``name`` (SIGKILL: as if its machine died); return how many."""
    procs = tagged(settings, name)
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    return len(procs)


def stop(settings: ClusterSettings, name: str | None = None, *, grace_s: float = 20.0) -> int:
    """SIGTERM every process of component ``name`` (all of the cluster's when None), SIGKILL what is
    left after ``grace_s``; wait until none is left. Returns how many there were."""
    procs = tagged(settings, name)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and tagged(settings, name):
        time.sleep(0.2)
    for _ in range(50):
        left = tagged(settings, name)
        if not left:
            break
        for proc in left:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.1)
    for pid_file in ([settings.pid_file(name)] if name else settings.root.glob("pids/*.pid")):
        pid_file.unlink(missing_ok=True)
    return len(procs)


def log_tail(settings: ClusterSettings, name: str, lines: int = 15) -> str:
    try:
        return "\n".join(settings.log_file(name).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def wait_until(settings: ClusterSettings, name: str, ready: Callable[[], bool], *, timeout_s: float,
               what: str) -> None:
    """Wait until ``ready()`` holds; fail naming ``name`` and its log when it dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ready():
                return
        except OSError:
            pass
        if not is_running(settings, name):
            raise ClusterError(f"{name} exited before {what} (log {settings.log_file(name)}):\n"
                               f"{log_tail(settings, name)}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{name}: no {what} after {timeout_s:.0f} s (log {settings.log_file(name)}):\n"
                               f"{log_tail(settings, name)}")
        time.sleep(0.5)


def log_contains(path: Path, marker: str, *, after: int = 0) -> bool:
    """Whether the log at ``path`` holds ``marker`` past byte ``after``."""
    try:
        with open(path, "rb") as fh:
            fh.seek(after)
            return marker.encode() in fh.read()
    except FileNotFoundError:
        return False
