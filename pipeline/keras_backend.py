"""Which Keras backend a job runs on, with no step for the user to remember.

Keras reads `KERAS_BACKEND` once, when it is first imported. A process that has not imported Keras yet
takes the job's backend (`select`). A process that already runs another one — a basic-launcher sweep
mixing backends, a reused joblib worker — hands the job to a worker process started on the job's
backend (`run_elsewhere`); the worker stays up for the rest of the sweep, so a study pays Python's and
the backend's start-up once per backend, not once per job. DVC's train stage runs another backend's
arms in one child (`run_child`).

    python -m pipeline.keras_backend     # a worker: reads jobs (JSON lines) on stdin, answers on fd 3
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.config import PROJECT_ROOT

REPLY_FD_ENV = "FROMLOGITS_REPLY_FD"
_workers: dict[str, tuple[subprocess.Popen, object]] = {}


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
    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT,
                               env={**os.environ, "KERAS_BACKEND": backend, **(env or {})})
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.wait()  # it got the same signal from the terminal; it ends its run KILLED itself
        raise
    if code == 130:
        raise KeyboardInterrupt
    return code


def run_elsewhere(backend: str, config: dict, overrides: list[str], output_dir: Path, parent_run_id: str | None,
                  job: int | None) -> dict:
    """Runs one job in this sweep's worker for `backend`; returns the worker's answer: {"run_id", "test_nll"} or
    {"failed": message}. Raises KeyboardInterrupt if it was interrupted. `config`: the job's config, resolved here,
    where Hydra's values for the job (`${hydra:job.num}`) are set; `overrides`: its Hydra overrides, to name it."""
    if backend not in _workers:
        read_end, write_end = os.pipe()
        process = subprocess.Popen([sys.executable, "-m", "pipeline.keras_backend"], cwd=PROJECT_ROOT,
                                   stdin=subprocess.PIPE, text=True, pass_fds=(write_end,),
                                   env={**os.environ, "KERAS_BACKEND": backend, REPLY_FD_ENV: str(write_end)})
        os.close(write_end)
        _workers[backend] = (process, os.fdopen(read_end))
        atexit.register(_stop_worker, backend)
    from pipeline.study import study_environment

    process, replies = _workers[backend]
    # The worker may have started in an earlier study of this command: it takes this one's variables.
    request = {"config": config, "overrides": overrides, "output_dir": str(output_dir), "parent_run_id": parent_run_id,
               "job": job, "environment": study_environment()}
    try:
        process.stdin.write(json.dumps(request) + "\n")
        process.stdin.flush()
        line = replies.readline()
    except KeyboardInterrupt:
        process.wait()  # it got the same signal from the terminal and ends its run KILLED itself
        raise
    if not line:  # the worker is gone: interrupted, or killed
        code = process.wait()
        _workers.pop(backend, None)
        if code == 130:
            raise KeyboardInterrupt
        return {"failed": f"the {backend} worker process ended with exit code {code}"}
    return json.loads(line)


def _stop_worker(backend: str) -> None:
    found = _workers.pop(backend, None)
    if found:
        process, _ = found
        if process.stdin:
            process.stdin.close()  # end of input: the worker exits
        process.wait()


def serve() -> int:
    """The worker: runs each job it is sent, as `python -m pipeline.run <overrides>` would, and answers."""
    from omegaconf import OmegaConf

    from pipeline.config import validate
    from pipeline.interrupt import install_stop_handlers

    install_stop_handlers(notice=None)  # the process that sent the job acknowledges a Ctrl-C
    from pipeline import stages, study  # after KERAS_BACKEND is set: stages imports Keras
    from pipeline.tracking import tracking_uri

    replies = os.fdopen(int(os.environ[REPLY_FD_ENV]), "w")
    for line in sys.stdin:
        request = json.loads(line)
        os.environ.update(request["environment"])
        dcfg = OmegaConf.create(request["config"])
        try:
            cfg = validate(dcfg)
            study.stop_with_launcher(tracking_uri(cfg.tracking.uri), request["parent_run_id"])  # as its sender does
            with study.job():
                result = stages.run_configuration(cfg, Path(request["output_dir"]), request["parent_run_id"],
                                                  request["job"], interrupted_attempt=study.interrupted_attempt())
            answer = {"run_id": result["run_id"], "test_nll": result["test_nll"]}
        except KeyboardInterrupt:
            sys.stdout.flush()
            os._exit(130)  # the training thread may still be inside the backend: do not wait for it
        except Exception as error:  # noqa: BLE001 - recorded like any failed sweep job; the sweep goes on
            stages.record_job_failure(dcfg, request["parent_run_id"], " ".join(request["overrides"]), error)
            answer = {"failed": str(error)}
        replies.write(json.dumps(answer) + "\n")
        replies.flush()
    return 0


if __name__ == "__main__":
    sys.exit(serve())
