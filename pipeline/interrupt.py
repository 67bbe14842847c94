"""How a run is stopped: the first SIGINT/SIGTERM asks training to stop at the end of the epoch, a
second one stops at once. Both entry points (pipeline.run, pipeline.dvc_stages) install the handlers."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable, TypeVar

T = TypeVar("T")

# Set by `request_stop`; the loop stops at the next epoch boundary, after the
# epoch's metrics and checkpoint are saved. Raising from the handler itself could land anywhere
# (inside a TensorFlow call, a garbage-collector callback) and be lost.
stop_requested = threading.Event()


RUN_NOTICE = "stopping after this epoch (again to stop now)"
STUDY_NOTICE = "stopping the study after the current epoch of its jobs (again to stop now)"
_notice: str | None = RUN_NOTICE


def request_stop(signum, frame) -> None:
    """SIGINT/SIGTERM: stop at the end of the current epoch (its checkpoint saved, the run KILLED);
    a second signal stops at once (the entry points wait for training in a helper thread, so the
    main thread, where Python runs this, is always free to)."""
    if stop_requested.is_set():
        print(f"\n{signal.Signals(signum).name} again: stopping now", file=sys.stderr, flush=True)
        raise KeyboardInterrupt
    stop_requested.set()
    if _notice:
        print(f"\n{signal.Signals(signum).name}: {_notice}", file=sys.stderr, flush=True)


class Interrupted(KeyboardInterrupt):
    """Training stopped on request at an epoch boundary; the checkpoint holds that epoch."""


def install_stop_handlers(notice: str | None = RUN_NOTICE) -> None:
    """`notice`: what the first signal prints; None in a launcher's worker, whose launching process
    acknowledges it once for the whole study."""
    global _notice
    if threading.current_thread() is not threading.main_thread():
        return  # Python takes signal handlers in the main thread only; a thread pool's job keeps the defaults
    _notice = notice
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)


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
