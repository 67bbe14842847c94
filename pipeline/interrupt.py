"""How a run is stopped: the first SIGINT/SIGTERM/SIGHUP asks training to stop at the end of the epoch, a
second one stops at once; after a SIGHUP, output meant for the hung-up terminal goes nowhere. Both entry
points (pipeline.run, pipeline.dvc_stages) install the handlers; the report commands, with no epoch to
finish, stop at the first (`install_immediate_stop`), and so does a study's report once its jobs have ended
(`stopping_at_once`)."""

from __future__ import annotations

import _thread
import contextlib
import errno
import os
import signal
import sys
import termios
import threading
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

# Ctrl-C; a scheduler's or a user's kill; the terminal closing (an ssh connection dropped, a window closed), which
# would otherwise kill the process outright and leave its run RUNNING.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Set by `request_stop`; the loop stops at the next epoch boundary, after the
# epoch's metrics and checkpoint are saved. Raising from the handler itself could land anywhere
# (inside a TensorFlow call, a garbage-collector callback) and be lost.
stop_requested = threading.Event()
# Set when a stop raises KeyboardInterrupt at once (a second signal; any signal where stops are immediate): the code
# it lands in may turn it into an error of its own (`caused_by_stop`).
stopped_at_once = threading.Event()


RUN_NOTICE = "stopping after this epoch (again to stop now)"
STUDY_NOTICE = "stopping the study after the current epoch of its jobs (again to stop now)"
_notice: str | None = RUN_NOTICE
# A stop relayed by a launching process to its jobs: always "after this epoch", never "now", so a job that
# also got the terminal's Ctrl-C is not stopped twice.
RELAYED_STOP = signal.SIGUSR1
# What a launcher's processes start with blocked (`shield_started_processes`): the stops a terminal sends its
# whole process group, and the relayed one.
SHIELDED = {signal.SIGINT, signal.SIGHUP, RELAYED_STOP}
_relays: list[Callable[[], None]] = []
_redelivering = False  # request_stop is called again for a stop that a finalizer swallowed: say it once
_ending = threading.Lock()  # held while this process ends its study: a second stop waits for that


def silence_hung_up_terminal(signum: int) -> None:
    """After SIGHUP, standard output and error that were the terminal that hung up go to /dev/null: writing to it
    fails (EIO), which would fail the run at its next progress line instead of letting it stop."""
    if signum != signal.SIGHUP:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                termios.tcgetattr(stream.fileno())
            except termios.error as error:
                if error.args[0] == errno.EIO:  # a terminal, hung up (any other file: ENOTTY)
                    os.dup2(devnull, stream.fileno())
            except (OSError, ValueError):  # no file descriptor (a test's capture, a closed stream)
                pass
    finally:
        os.close(devnull)


def request_stop(signum, frame) -> None:
    """SIGINT/SIGTERM/SIGHUP: stop at the end of the current epoch (its checkpoint saved, the run KILLED);
    a second signal stops at once (the entry points wait for training in a helper thread, so the
    main thread, where Python runs this, is always free to)."""
    global _redelivering
    silence_hung_up_terminal(signum)
    if stop_requested.is_set():
        if _notice and not _redelivering:  # a launcher's worker leaves it to its launching process, as below
            print(f"\n{signal.Signals(signum).name} again: stopping now", file=sys.stderr, flush=True)
        _redelivering = False
        if not _ending.locked():
            stopped_at_once.set()
            raise KeyboardInterrupt
        return
    stop_requested.set()
    if _notice:
        print(f"\n{signal.Signals(signum).name}: {_notice}", file=sys.stderr, flush=True)
    for relay in _relays:
        relay()


def redeliver_swallowed_stop(unraisable) -> None:
    """sys.unraisablehook: the KeyboardInterrupt of a stop that stops at once (a second signal here; any signal
    after `install_immediate_stop`) can land in a finalizer (a weakref callback of SQLAlchemy's,
    a __del__), where Python prints "Exception ignored" and goes on as if nothing happened. It is raised again
    in the main thread's own code instead."""
    global _redelivering
    if issubclass(unraisable.exc_type, KeyboardInterrupt) and stop_requested.is_set():
        _redelivering = True
        # From a helper thread a moment later: request_stop then runs in the main thread's code, not in
        # this hook (where it would be swallowed again); if it lands in a finalizer again, it comes back here.
        threading.Timer(0.05, _thread.interrupt_main).start()
        return
    sys.__unraisablehook__(unraisable)


def caused_by_stop(error: BaseException) -> bool:
    """Whether `error` is a stop's doing: its KeyboardInterrupt, or any error raised once a stop at once was
    delivered, since the code that KeyboardInterrupt lands in may turn it into an error of its own (a C extension
    being imported, matplotlib's Agg backend as a report starts drawing or MLflow's model logging, raises
    "ImportError: initialization failed"). After a first stop that waits for the epoch's end, an error is an error."""
    return isinstance(error, KeyboardInterrupt) or stopped_at_once.is_set()


@contextlib.contextmanager
def ending() -> Iterator[None]:
    """Around the few seconds in which a stopping process closes its study and runs in MLflow: a second
    signal then does not interrupt them (it would land inside a store transaction and leave runs open)."""
    with _ending:
        yield


def relay_stops(relay: Callable[[], None]) -> None:
    """Also calls `relay` on the first stop request (to pass it on to jobs the signal may not reach)."""
    _relays.append(relay)


def forget_relays() -> None:
    """Drops the relays registered so far (an earlier study's, in a command that runs several)."""
    _relays.clear()


class Interrupted(KeyboardInterrupt):
    """Training stopped on request at an epoch boundary; the checkpoint holds that epoch."""


class StoppedBeforeStart(SystemExit):
    """A stop came before a study opened (while the command started up, or between the studies of one
    command): nothing of it ran. Exit code 130; the entry point says what did not start."""

    def __init__(self) -> None:
        super().__init__(130)


def install_stop_handlers(notice: str | None = RUN_NOTICE) -> None:
    """`notice`: what the first signal prints; None in a launcher's worker, whose launching process
    acknowledges it once for the whole study."""
    global _notice
    if threading.current_thread() is not threading.main_thread():
        return  # Python takes signal handlers in the main thread only; a thread pool's job keeps the defaults
    _notice = notice
    for signum in STOP_SIGNALS:
        signal.signal(signum, request_stop)
    signal.signal(RELAYED_STOP, lambda signum, frame: stop_requested.set())
    sys.unraisablehook = redeliver_swallowed_stop
    # A launcher's job may start with these blocked (see `shield_started_processes`); a stop that came
    # meanwhile is pending and arrives now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SHIELDED)


def install_immediate_stop() -> None:
    """For a short command with no epoch to finish (the report commands): the first stop signal raises
    KeyboardInterrupt at once, raised again where a finalizer swallows it (`redeliver_swallowed_stop`)."""

    def stop_now(signum, frame) -> None:
        silence_hung_up_terminal(signum)
        stop_requested.set()  # what redeliver_swallowed_stop asks before raising it again
        stopped_at_once.set()
        raise KeyboardInterrupt

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop_now)
    sys.unraisablehook = redeliver_swallowed_stop


@contextlib.contextmanager
def stopping_at_once() -> Iterator[None]:
    """Within the block the first stop signal raises KeyboardInterrupt at once, as after
    `install_immediate_stop` (for work with no epoch left to finish: a study's report once its jobs have
    ended); a stop that came just before the block raises it as the block starts. The handlers before
    return after it."""
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    install_immediate_stop()
    try:
        if stop_requested.is_set():
            stopped_at_once.set()
            raise KeyboardInterrupt
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def shield_started_processes() -> None:
    """Processes started from this (main) thread from now on inherit SIGINT and SIGHUP blocked; this process
    still gets them, on a helper thread, and handles them as before (Python runs the handler in the main thread).

    For a launcher's processes: Ctrl-C reaches the terminal's whole process group, and a submitit
    controller that gets it prints a KeyboardInterrupt traceback and SIGKILLs its job a second later.
    Shielded, it waits instead while its job, which unblocks SIGINT when it installs its handlers (a
    Ctrl-C during its start-up stays pending until then), stops at the end of its epoch and ends its run
    KILLED; the same for a terminal that hangs up. RELAYED_STOP is blocked the same way, so a relayed stop
    never kills a job or a joblib worker that is still starting (its default action would).
    """
    helper = threading.Thread(target=threading.Event().wait, name="signals", daemon=True)
    helper.start()  # created before the block: its mask keeps SIGINT and SIGHUP deliverable
    signal.pthread_sigmask(signal.SIG_BLOCK, SHIELDED)


def interruptible(work: Callable[[], T]) -> T:
    """Runs `work` in a helper thread while this (main) thread waits in short steps.

    Python runs signal handlers only in the main thread and only between bytecodes; a compiled epoch
    can keep a thread inside TensorFlow for minutes. Waiting here keeps the main thread responsive,
    so the handler's first signal is acknowledged at once and a second one stops at once.
    """
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = work()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread below
            outcome["error"] = error

    worker = threading.Thread(target=target, name="training", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
