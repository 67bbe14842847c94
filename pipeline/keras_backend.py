"""Which Keras backend a job runs on, with no step for the user to remember.

Keras reads `KERAS_BACKEND` once, when it is first imported. A process that has not imported Keras yet
takes the job's backend (`select`); a process that already runs another one — a basic-launcher sweep
mixing backends, a reused joblib worker, DVC's train stage — runs the job as a child process with the
right `KERAS_BACKEND` (`run_child`), which logs into the same study parent run.
"""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.config import PROJECT_ROOT

DELEGATED_JOB_ENV = "FROMLOGITS_DELEGATED_JOB"  # set for a child: its job number in the study ("" outside one)


def select(name: str) -> bool:
    """Makes Keras start on `name` if it has not started yet; returns whether this process runs `name`."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = name
        return True
    import keras

    return keras.config.backend() == name


def run_child(module: str, args: list[str], backend: str, env: dict[str, str] | None = None) -> int:
    """Runs `python -m module args` on `backend`, streaming its output; returns its exit code
    (raises KeyboardInterrupt if it was interrupted, so the caller stops as it would have)."""
    child_env = {**os.environ, "KERAS_BACKEND": backend, **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, env=child_env)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.wait()  # it got the same signal from the terminal; it ends its run KILLED itself
        raise
    if code == 130:
        raise KeyboardInterrupt
    return code

