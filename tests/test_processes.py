"""A process is told apart from a later one with its pid by a start that the wall clock does not move; a run is
ended for a process that is gone only if that process did not end it itself."""

from __future__ import annotations

import os
import socket
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


@pytest.mark.parametrize("looker", ["mark_stale_runs", "end_orphaned_children"])
def test_a_run_ended_by_its_own_process_while_others_look_for_stale_runs_keeps_its_status(tmp_path, monkeypatch, looker):
    """Found in the suite: the launcher of a parallel study was SIGKILLed, and both its workers stopped. One
    ended its run KILLED and went on to mark stale runs. Meanwhile the other, listed as RUNNING by it, ended its
    own run KILLED and exited; found gone, its run was then overwritten FAILED ("stale: ... ended without
    closing the run"). Here the owner ends its run and exits between the listing and the liveness check."""
    import mlflow

    from pipeline.record import Tag
    from pipeline.tracking import store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("races")
    parent = client.create_run(experiment_id).info.run_id
    child, started = named_child()
    tags = {"host": socket.gethostname(), "pid": str(child.pid), "pid_started": started, Tag.PARENT: parent}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    checked = []

    def owner_ends_its_run_and_exits_first(run_tags):
        if run_tags.get("pid") == str(child.pid) and not checked:
            client.set_terminated(run_id, "KILLED")
            child.kill()
            child.wait()
        checked.append(run_tags.get("pid"))
        return not process_alive(run_tags["pid"], run_tags["pid_started"])

    monkeypatch.setattr(store, "process_gone", owner_ends_its_run_and_exits_first)
    if looker == "mark_stale_runs":
        ended = store.mark_stale_runs(client, experiment_id)
    else:
        ended = store.end_orphaned_children(uri, parent, RuntimeError("the launcher failed"), wait_seconds=0)
    assert checked and ended == []
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and Tag.FAILED_REASON not in run.data.tags
