"""Which process this is, and whether another still runs: how the pipeline tells a live writer from one that
was killed (a run in MLflow, a report being staged), on this host.

A process is named by its host, pid and start; the start tells it from a later process that was given the
same pid. On Linux the start is the clock tick since boot at which the process began, with the boot's id: a
wall-clock start (psutil's `create_time`, boot time + ticks) moves when the wall clock is stepped or a VM
resumes, and a live process would then look like another one.
"""

from __future__ import annotations

import functools
import socket
from pathlib import Path

import psutil

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@functools.cache
def _boot() -> str | None:
    """This boot's id, shortened (it changes only with a reboot, which ends this process too); None without /proc."""
    try:
        return _BOOT_ID.read_text().strip().replace("-", "")[:12]
    except OSError:
        return None


def _start(pid: int) -> str:
    """Process `pid`'s start as `process_tags` records it: "<ticks since boot>@<boot id>" where /proc has
    them, else the wall-clock start. Raises psutil.Error (OSError on Linux) when there is no such process."""
    boot = _boot()
    if boot is None:
        return f"{psutil.Process(pid).create_time():.3f}"
    # Field 22 of /proc/<pid>/stat, counted after the command name, which may itself hold spaces and ")".
    ticks = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    return f"{ticks}@{boot}"


def process_tags() -> dict[str, str]:
    """This process's name, as a run's tags: lets a later invocation tell a live run from a killed one."""
    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": str(me.pid), "pid_started": _start(me.pid)}


def process_alive(pid: str, started: str) -> bool:
    """Whether process `pid`, started at `started` (`process_tags`), still runs on this host."""
    try:
        process = psutil.Process(int(pid))
        if "@" in started:
            same = _start(process.pid) == started
        else:  # a wall-clock start, as versions before 2026-12 recorded it
            same = abs(process.create_time() - float(started)) < 1.0
        # Same process, and not a zombie (killed, not yet reaped by a parent that died too).
        return same and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, OSError, ValueError, IndexError):
        return False


def named_on_this_host(tags: dict[str, str]) -> bool:
    """Whether `tags` (a run's) carry the `process_tags` of a process on this host, which it can look up."""
    return tags.get("host") == socket.gethostname() and "pid" in tags


def process_gone(tags: dict[str, str]) -> bool:
    """Whether the process these `process_tags` name has ended (killed, or exited without closing its run)."""
    return not process_alive(tags["pid"], tags.get("pid_started", "0"))
