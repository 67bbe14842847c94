"""A process is told apart from a later one with its pid by a start that the wall clock does not move."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.processes import process_alive, process_tags

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.access("/proc/sys/kernel/random/boot_id", os.R_OK),
    reason="a start since boot needs Linux's /proc boot id (elsewhere processes.py falls back to wall-clock starts)")


@pytest.fixture
def wall_clock_jumps(monkeypatch):
    """Moves the boot time psutil derives from the wall clock, as a clock step or a resumed VM does."""
    from psutil import _pslinux

    booted = _pslinux.boot_time()

    def jump(seconds: float) -> None:
        monkeypatch.setattr(_pslinux, "boot_time", lambda: booted + seconds)

    return jump


def named_child():
    """A live child process and the `process_tags` it recorded for itself."""
    code = ("import time; from pipeline.processes import process_tags; t = process_tags();"
            "print(t['pid'], t['pid_started'], flush=True); time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid, started = child.stdout.readline().split()
    assert int(pid) == child.pid
    return child, started


def test_a_live_process_stays_alive_when_the_wall_clock_jumps(wall_clock_jumps):
    me = process_tags()
    child, started = named_child()
    try:
        assert process_alive(str(child.pid), started) and process_alive(me["pid"], me["pid_started"])
        for seconds in (27.0, -3600.0):  # 27 s: what this VM's clock did during a test session
            wall_clock_jumps(seconds)
            assert process_alive(str(child.pid), started), seconds
            assert process_alive(me["pid"], me["pid_started"]), seconds
            assert process_tags() == me  # one process, one name, whatever the clock says
    finally:
        child.kill()
        child.wait()
    assert not process_alive(str(child.pid), started)  # ended and reaped


def test_another_start_or_another_boot_is_another_process():
    me = process_tags()
    assert process_alive(me["pid"], me["pid_started"])
    assert not process_alive(me["pid"], "1.000")  # a start long ago: an earlier process with this pid
    assert not process_alive(me["pid"], "not a start") and not process_alive("x", me["pid_started"])


def test_a_start_recorded_by_an_earlier_version_as_wall_clock_time_is_still_read():
    import psutil

    me = psutil.Process()
    assert process_alive(str(me.pid), f"{me.create_time():.3f}")
    assert not process_alive(str(me.pid), f"{me.create_time() - 5:.3f}")
