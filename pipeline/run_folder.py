"""A single run's folder (`hydra.run.dir`), which Hydra makes and writes (its configs and log) before the run
starts: when that fails (a full disk, a path where no folder can be made), one line names the folder and
the cause, and what Hydra wrote there in this command is removed; nothing else is. The same is removed when
the run itself is refused (bad input, exit 2) before it wrote anything of its own there.

Hydra would report it as a traceback with exit 1 and leave empty files behind. A study's sweep folder is
the study's concern (`pipeline.study`): its launcher writes it, and the study ends FAILED in one line.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # what Hydra saves into <run>/<output_subdir>


@dataclass
class Plan:
    folder: Path
    paths: list[Path]  # what Hydra may create, parents before children
    existed: set[Path] = field(default_factory=set)
    started: bool = False  # the run itself started: any later failure is the run's, not the folder's
    made_at: float = field(default_factory=time.time)  # before Hydra wrote anything there


_plan: Plan | None = None


class RunFolder(Callback):
    """Notes, before Hydra touches the run's folder, what of it exists, and when the run itself starts."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        global _plan
        hydra = HydraConfig.instance()
        previous = hydra.cfg
        hydra.set_config(config)  # the folder's name may read ${hydra:...}, which Hydra sets only later
        try:
            folder = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()  # `now` is cached: Hydra's value
        finally:
            hydra.cfg = previous
        missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
        subdir = OmegaConf.select(config, "hydra.output_subdir")
        written = [folder / f"{OmegaConf.select(config, 'hydra.job.name')}.log"]
        if subdir is not None:
            written = [folder / subdir, *(folder / subdir / name for name in HYDRA_FILES), *written]
        _plan = Plan(folder, [*missing, *written], existed={p for p in written if p.exists()})

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if _plan is not None:
            _plan.started = True


def _remove_what_hydra_wrote() -> None:
    for path in reversed(_plan.paths):  # children first; only what did not exist before this command
        if path not in _plan.existed:
            with contextlib.suppress(OSError):  # a folder is removed only if empty: never anything else in it
                if path.is_dir():
                    path.rmdir()
                else:
                    path.unlink()


def unwritable(error: BaseException) -> str | None:
    """If `error` is Hydra failing to make or write this command's run folder before the run started: removes
    what it wrote there and returns the one-line error; otherwise None."""
    if _plan is None or _plan.started or not isinstance(error, OSError):
        return None
    _remove_what_hydra_wrote()
    cause = error.strerror or str(error)
    if error.filename:
        cause = f"{error.filename}: {cause}"
    return (f"could not write the run's folder {_plan.folder} ({cause}); nothing ran and nothing of it was kept: "
            f"fix that (e.g. free space there) or set hydra.run.dir= to another folder")


def refused() -> None:
    """The run was refused (bad input, exit 2): what Hydra wrote into its folder in this command is removed,
    unless the run wrote there too (e.g. its metrics.json before a later step failed): then all of it stays."""
    if _plan is None or not _plan.folder.is_dir():
        return
    hydras = set(_plan.paths)
    with contextlib.suppress(OSError):
        if any(path not in hydras and path.stat().st_mtime >= _plan.made_at for path in _plan.folder.iterdir()):
            return
        _remove_what_hydra_wrote()
