"""Which process this is, and whether another still runs: how the pipeline tells a live writer from one that
was killed (a run in MLflow, a report being staged), on this host.

A process is named by its host, pid and start time; the start time tells it from a later process that was
given the same pid.
"""

from __future__ import annotations

import socket

import psutil


def process_tags() -> dict[str, str]:
    """This process's name, as a run's tags: lets a later invocation tell a live run from a killed one."""
    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": str(me.pid), "pid_started": f"{me.create_time():.3f}"}


def process_alive(pid: str, started: str) -> bool:
    """Whether process `pid`, started at `started` (`process_tags`), still runs on this host."""
    try:
        process = psutil.Process(int(pid))
        # Same pid, same process, and not a zombie (killed, not yet reaped by a parent that died too).
        return abs(process.create_time() - float(started)) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return False


def named_on_this_host(tags: dict[str, str]) -> bool:
    """Whether `tags` (a run's) carry the `process_tags` of a process on this host, which it can look up."""
    return tags.get("host") == socket.gethostname() and "pid" in tags


def process_gone(tags: dict[str, str]) -> bool:
    """Whether the process these `process_tags` name has ended (killed, or exited without closing its run)."""
    return not process_alive(tags["pid"], tags.get("pid_started", "0"))
