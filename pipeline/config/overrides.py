"""A command line's overrides, checked before Hydra starts, and the sweep they describe.

`precheck_overrides` composes every value of a sweep with the fixed overrides and validates it, checks
every value a study preset sweeps (its `hydra.sweeper.params`) and composes the command line's own Hydra
settings, so a typo in the fifth value fails in one line before the study opens; it also refuses an output_dir
that a sweep's jobs would share. `sweep_values`/`count_jobs` expand a sweep the way Hydra's basic sweeper does
(glob sweeps through Hydra's config loader, `parse_overrides`), for the pre-check and the study's progress count
alike; `as_first_job` resolves a config as in its first job, where Hydra has set its runtime values.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from pathlib import Path
from typing import Iterator

from omegaconf import OmegaConf

from pipeline.config import PROJECT_ROOT, PipelineError, first_line, require_folder, validate, value_problem

HYDRA_OUTPUT_DIRS = ("hydra.run.dir", "hydra.sweep.dir")  # Hydra creates them before any job runs
# Hydra's flags for one configuration, which it refuses with --multirun (-m).
ONE_CONFIG_FLAGS = ("--cfg", "-c", "--info", "-i", "--run", "-r", "--shell-completion", "-sc")
# Hydra's flags that take the next argument as their value; --info takes one of its choices if one follows.
VALUED_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                "--experimental-rerun")
INFO_FLAGS, INFO_CHOICES = ("--info", "-i"), ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
# What Hydra's grammar reads only inside quotes (with spaces), as a value starts or anywhere in it.
UNQUOTABLE = "~!#&;<=>^`()[]{},'\""
# An output_dir naming a folder of each job's own: Hydra's number, id or overrides of the job, or the job's folder.
PER_JOB = re.compile(r"\$\{hydra:(job\.(num|id|override_dirname)|runtime\.output_dir)\}")
# A job folder (hydra.sweep.subdir, inside Hydra's own node) of each job's own: the job's number, id or overrides.
PER_JOB_SUBDIR = re.compile(r"\$\{hydra[.:]job\.(num|id|override_dirname)\}")


def not_an_override(argv: list[str]) -> str | None:
    """The first argument that is neither a flag, a flag's value nor an override (key=value, ~key), or None."""
    previous = None
    for arg in argv:
        a_value = previous in VALUED_FLAGS or (previous in INFO_FLAGS and arg in INFO_CHOICES)
        if not a_value and not arg.startswith(("-", "~")) and "=" not in arg:
            return arg
        previous = arg
    return None


def override_lines(argv: list[str]) -> list[str]:
    """A command line's config overrides (key=value), without Hydra's own flags (-m, --cfg …)."""
    return [a for a in argv if not a.startswith("-") and "=" in a]


@contextlib.contextmanager
def project_hydra() -> Iterator[None]:
    """Hydra initialized on the project's conf/ for the block, unless it already is (in a study's launcher)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        yield


def parse_overrides(lines: list[str]) -> list:
    """Hydra's parse of override lines, as its sweeper parses them: with the project's config loader, through which
    a glob sweep (`loss=glob(*)`) lists its group's options when it is iterated (the overrides keep the loader).
    Raises OverrideParseException."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with project_hydra():
        return OverridesParser.create(config_loader=GlobalHydra.instance().config_loader()).parse_overrides(lines)


def sweep_values(lines: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Hydra override lines as (fixed overrides, {swept key: its values}). Raises OverrideParseException."""
    return split_sweeps(parse_overrides(lines))


def split_sweeps(parsed: list) -> tuple[list[str], dict[str, list[str]]]:
    """Parsed overrides as (fixed overrides, {swept key: its values}); a later override of a key, swept or
    fixed, replaces an earlier sweep of it, as Hydra's basic sweeper does. Hydra's own keys are left out."""
    fixed, sweeps = [], {}
    for override in parsed:
        if override.key_or_group.startswith("hydra"):
            continue
        if override.is_sweep_override():
            sweeps[override.get_key_element()] = list(override.sweep_string_iterator())
        else:
            sweeps.pop(override.get_key_element(), None)
            fixed.append(override.input_line)
    return fixed, sweeps


def hydra_output_dirs(overrides: list) -> dict[str, str]:
    """The run or sweep folder parsed overrides set, where it is a plain path (no interpolation)."""
    return {o.key_or_group: str(o.value()) for o in overrides
            if o.key_or_group in HYDRA_OUTPUT_DIRS and not o.is_sweep_override() and "${" not in str(o.value())}


def unknown_group_option(overrides: list) -> str | None:
    """Among parsed overrides, a config group's value that is not one of its options: Hydra would read
    `loss=../experiment/atlas` as a path into another group's folder. Needs an initialized Hydra."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    for override in overrides:
        options = loader.get_group_options(override.key_or_group)
        values = override.sweep_string_iterator() if override.is_sweep_override() else [override.value()]
        for value in values:
            if options and value not in (None, "null") and str(value) not in options:
                return f"{override.key_or_group}={value} is not accepted: expected one of {', '.join(options)}"
    return None


def studies_of(argv: list[str]) -> dict[str | None, list[str]]:
    """A multirun's command line as one command line per study, by study preset: with `experiment=a,b`,
    {a: ..., b: ...}, run in turn by one process whose launcher's workers serve them all; any other command
    line is one study, {None: argv}. Raises PipelineError where the studies would share what each must own.
    Expects overrides Hydra can parse (after `precheck_overrides`)."""
    lines = override_lines(argv)
    parsed = parse_overrides(lines)
    presets = [o for o in parsed if o.key_or_group == "experiment"]
    if not presets or not presets[-1].is_sweep_override():
        return {None: argv}
    swept = presets[-1]
    names = list(swept.sweep_string_iterator())
    names_study = lambda line: re.search(r"\$\{[^}]*\bstudy\b", line)  # ${study}, ${oc.select:study,…}  # noqa: E731
    expected = {
        "study": "expected each study's own name (leave study out)",
        "hydra.sweep.dir": "expected a sweep folder that differs by study, e.g. hydra.sweep.dir='<folder>/${study}'",
        "output_dir": "expected an output folder that differs by study and job, e.g. "
                      "output_dir='<folder>/${study}/${hydra:job.num}'",
    }
    for override in parsed:
        key, line = override.key_or_group, override.input_line
        shared = key == "study" or (key == "hydra.sweep.dir" and not names_study(line)) or (
            # the job's own folder lies in its study's sweep folder, which names the study (above)
            key == "output_dir" and not names_study(line) and "${hydra:runtime.output_dir}" not in line)
        if shared:
            raise PipelineError(f"{line} is not accepted with {swept.input_line}: every study would share it; {expected[key]}")
    key = swept.input_line.split("=", 1)[0]
    return {name: [f"{key}={name}" if arg == swept.input_line else arg for arg in argv] for name in names}


def count_jobs(sweeps: dict[str, list[str]]) -> int:
    """How many jobs the basic sweeper launches: the product of the sweeps' lengths."""
    return math.prod(len(values) for values in sweeps.values())


def composition_error(override: str, error: Exception) -> str:
    """Hydra's multi-line composition error as one line naming the value and what is accepted."""
    from hydra.errors import MissingConfigException

    message = str(error)
    if isinstance(error, MissingConfigException) and "Available options in" in message:
        options = [line.strip() for line in message.split("Available options in", 1)[1].splitlines()[1:]
                   if line.startswith("\t") and "provider=" not in line]
        return f"{override} is not accepted: expected one of {', '.join(options)}"
    return f"{override} is not accepted: {value_problem(error.__cause__ or error)}"


def parse_error(lines: list[str], error: Exception) -> str:
    """Hydra's parse error as one line naming the override it cannot read and what its grammar accepts."""
    from hydra.errors import OverrideParseException

    for line in lines:
        try:
            parse_overrides([line])
        except OverrideParseException as line_error:
            return (f"{line} is not accepted: cannot parse it ({first_line(line_error)}); expected key=value in "
                    f"Hydra's override grammar, with a value holding spaces or any of {UNQUOTABLE} quoted")
    return f"cannot parse the overrides: {first_line(error)}"


def precheck_overrides(argv: list[str]) -> str | None:
    """Composes the command line's config overrides before Hydra does; returns a one-line error or None.

    Hydra reports a bad override over several lines with a hint about HYDRA_FULL_ERROR; researchers
    should instead read which value is wrong and what is accepted. Every value of a sweep is checked
    (each with the fixed overrides), so a typo in the fifth value fails before the first job starts.
    """
    stray = not_an_override(argv)
    if stray:  # Hydra's parse error, over two lines
        return f"{stray} is not accepted: expected key=value in Hydra's override grammar (e.g. loss=probs), or a flag"
    multirun = "-m" in argv or "--multirun" in argv
    one_config = next((a for a in argv if a.split("=", 1)[0] in ONE_CONFIG_FLAGS), None) if multirun else None
    if one_config:  # Hydra's ValueError, as a traceback
        return (f"{one_config} is not accepted with -m: it shows or runs one configuration; expected it without -m, "
                "e.g. python -m pipeline.run experiment=seed_mnist --cfg job")
    with project_hydra():
        return _precheck(override_lines(argv), multirun)


@contextlib.contextmanager
def as_first_job(config, multirun: bool) -> Iterator[None]:
    """Hydra's runtime config set for the block as Hydra sets it for the first job of `config` (a composition with
    Hydra's config): its number and id in a sweep, and its folder. A value that reads them (`${hydra:job.num}`,
    `${hydra:runtime.output_dir}`) then resolves as it will in the job; without, the pre-check refused it
    ("HydraConfig was not set"), as did a study's launching process, where Hydra sets none. `config` is left as
    it is; the runtime config set before is restored."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    holder = HydraConfig.instance()
    before = holder.cfg
    config = copy.deepcopy(config)  # a launcher's own config, or a composition the pre-check reads again
    try:
        if multirun:  # as Hydra's launchers number their jobs
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.job.num, config.hydra.job.id = 0, "0"
        holder.set_config(config)  # the folder's name may read the job's choices (${hydra:runtime.choices.loss})
        folder = Path(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir)) if multirun else Path(config.hydra.run.dir)
        with read_write(config.hydra), open_dict(config.hydra):  # set_config made it read-only
            config.hydra.runtime.output_dir = str(folder.absolute())
        holder.set_config(config)
        yield
    finally:
        holder.cfg = before


def shared_output_problem(studies: list, lines: list[str], subdir: str | None = None) -> str | None:
    """An output_dir that several jobs of a study would share, as one line; None if none. Each job writes its
    metrics.json there: one over the other, one left. `studies`: each study's composed config; `lines`: the
    command line's overrides. A study's jobs share a value that does not name the job (`PER_JOB`); that studies
    (`experiment=a,b`) share it is `studies_of`'s to refuse. With output_dir unset, each job writes into its Hydra
    folder, hydra.sweep.subdir under hydra.sweep.dir, which must then name the job (`PER_JOB_SUBDIR`): `subdir` as
    typed on the command line, else each study's own."""
    for config in studies:
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        _, sweeps = sweep_values([f"{key}={value}" for key, value in params.items()] + lines)
        sweeps.pop("experiment", None)
        values = sweeps.pop("output_dir", None) or [OmegaConf.to_container(config, resolve=False)["output_dir"]]
        jobs = count_jobs(sweeps)  # of each output_dir value
        folder = str(OmegaConf.to_container(config.hydra.sweep, resolve=False)["subdir"]) if subdir is None else subdir
        if values == [None] and jobs > 1 and not PER_JOB_SUBDIR.search(folder):
            return (f"hydra.sweep.subdir={folder!r} is not accepted in a sweep of {jobs} jobs: each job's folder would "
                    "be the same, and each job would write its metrics.json there over the one before; expected a "
                    "folder per job, e.g. hydra.sweep.subdir='${hydra.job.num}'")
        for value in values:
            if value is not None and jobs > 1 and not PER_JOB.search(str(value)):
                return (f"output_dir={str(value)!r} is not accepted in a sweep of {jobs * len(values)} jobs: each would "
                        f"write its metrics.json there over the one before; expected it unset (each job writes in "
                        f"its own folder, hydra.sweep.subdir) or a folder per job, e.g. output_dir='{value}/${{hydra:job.num}}'")
    return None


def job_folder_problem(studies: list, typed: dict[str, str]) -> str | None:
    """A job folder typed as a plain path (hydra.sweep.subdir, under hydra.sweep.dir) that cannot be made, as one
    line; None if none. `typed`: the command line's hydra.sweep.dir and hydra.sweep.subdir. Hydra makes the folder
    only as the job starts: the study had opened, then its launcher failed."""
    subdir, sweep_dir = typed.get("hydra.sweep.subdir"), typed.get("hydra.sweep.dir")
    if not subdir or "${" in subdir:  # none, or empty (the sweep folder, checked as hydra.sweep.dir), or per job
        return None
    for config in studies:
        within = sweep_dir
        if within is None or "${" in within:
            with as_first_job(config, multirun=True):
                within = str(config.hydra.sweep.dir)  # the study's own, as its first job resolves it
        try:
            require_folder("hydra.sweep.subdir", subdir, Path(within, subdir).absolute(), writable=True)
        except PipelineError as error:
            return str(error)
    return None


def foreign_report_folder_problem(studies: list) -> str | None:
    """A study whose report folder is someone else's, as one line; None if none. `studies`: each study's composed
    config. Here, with `experiment=a,b`, no study of the command has trained yet when b's is found."""
    from pipeline.study import validated_study

    for config in studies:
        try:
            validated_study(config)
        except PipelineError as error:
            return str(error)
    return None


def _precheck(lines: list[str], multirun: bool) -> str | None:
    """`precheck_overrides` of the override lines, inside `project_hydra`."""
    from hydra import compose
    from hydra.errors import OverrideParseException

    try:
        parsed = parse_overrides(lines)
    except OverrideParseException as error:
        return parse_error(lines, error)
    fixed, sweeps = split_sweeps(parsed)
    for override in parsed:
        if override.key_or_group.startswith("hydra") and override.is_sweep_override():
            return (f"{override.input_line} is not accepted: Hydra's own settings cannot be swept; expected a sweep of "
                    "the pipeline's config (e.g. seed=0,1,2), or a sweeper param quoted for Hydra "
                    "(e.g. \"hydra.sweeper.params.seed='0,1,2'\")")
    for key, values in sweeps.items():
        repeated = sorted({v for v in values if values.count(v) > 1})
        if not values or repeated:
            problem = f"{', '.join(repeated)} appears more than once" if repeated else "it sweeps no values"
            typed = next(o.input_line for o in reversed(parsed) if o.get_key_element() == key)
            return f"{typed} is not accepted: {problem}; expected distinct values, at least one"
    for key, value in hydra_output_dirs(parsed).items():
        try:
            require_folder(key, value, Path(value).absolute(), writable=True)  # relative to where Hydra starts
        except PipelineError as error:
            return str(error)
    problem = unknown_group_option(parsed)
    if problem:
        return problem

    # The sweeper's params set on the command line are composed with each study's config: the fixed overrides,
    # or each swept preset (`experiment=a,b` runs a study per preset, each with its own sweeper params).
    sweeper_params = [o.input_line for o in parsed if o.key_or_group.startswith("hydra.sweeper.params.")]
    presets_swept = "experiment" in sweeps
    studies = []  # each study's composed config: where its preset's sweeps are read from

    def composed(overrides: list[str], with_sweeper_params: bool):
        """(the validated config, None), or (None, the composition or validation error)."""
        try:
            config = compose(config_name="config", overrides=[*overrides, *sweeper_params] if with_sweeper_params
                             else overrides, return_hydra_config=True)
            with as_first_job(config, multirun):
                validate(config)
        except Exception as error:  # noqa: BLE001 - every composition or validation error becomes one line
            return None, error
        return config, None

    trials = [(None, fixed, not presets_swept)] + [(f"{key}={value}", [*fixed, f"{key}={value}"], key == "experiment")
                                                   for key, values in sweeps.items() for value in values]
    for override, overrides, a_study in trials:
        config, error = composed(overrides, with_sweeper_params=a_study)
        if error is None:
            if a_study:
                studies.append(config)
            continue
        if isinstance(error, PipelineError):
            return str(error)  # names its key and value itself
        if a_study and sweeper_params:
            without, _ = composed(overrides, with_sweeper_params=False)
            if without is not None:  # the sweeper params are at fault
                return (f"{' '.join(sweeper_params)} is not accepted: " + (
                    f"{first_line(error.__cause__ or error)}" if OmegaConf.select(without, "hydra.sweeper.params")
                    else "this config sweeps nothing of its own (its hydra.sweeper.params is null); expected it "
                         "with a study preset that does, e.g. experiment=seed_mnist, or the sweep itself on the "
                         "command line (seed=0,1)"))
        if override is None:  # the fixed overrides together: name the first that fails on its own
            override = next((line for line in fixed if composed([line], False)[1] is not None), " ".join(fixed))
        return composition_error(override, error)
    sweep_folders = {o.key_or_group: str(o.value()) for o in parsed
                     if o.key_or_group in ("hydra.sweep.dir", "hydra.sweep.subdir")}  # as typed
    return (hydra_settings_problem(fixed, parsed) or preset_sweep_problem(studies, parsed)
            or (shared_output_problem(studies, lines, sweep_folders.get("hydra.sweep.subdir"))
                or job_folder_problem(studies, sweep_folders) or foreign_report_folder_problem(studies)
                if multirun else None))


def hydra_settings_problem(fixed: list[str], parsed: list) -> str | None:
    """The command line's own Hydra settings (`hydra.…=`, `hydra/<group>=`; the sweeper's params are checked with
    each study) composed with the fixed overrides: the first that Hydra cannot compose, or one that Hydra's plugins
    refuse only once the study has opened (joblib's n_jobs=0, the basic sweeper's max_batch_size=0), as one line;
    None if none. Either way Hydra would have opened the study's parent run and failed it, or printed a traceback."""
    from hydra import compose

    # Group choices first (Hydra applies them before values), so a launcher's key is named after its launcher.
    settings = sorted((o.input_line for o in parsed if o.key_or_group.startswith("hydra")
                       and not o.key_or_group.startswith("hydra.sweeper.params.")),
                      key=lambda line: "/" not in line.split("=", 1)[0])
    if not settings:
        return None

    def composition(count: int):
        return compose(config_name="config", overrides=[*fixed, *settings[:count]], return_hydra_config=True)

    try:
        config = composition(len(settings))
    except Exception:  # noqa: BLE001 - named below: the first setting that fails with those before it
        for count in range(1, len(settings) + 1):
            try:
                composition(count)
            except Exception as error:  # noqa: BLE001 - every composition error becomes one line
                return composition_error(settings[count - 1], error)
        raise
    n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs")
    if n_jobs == 0:
        return ("hydra.launcher.n_jobs=0 is not accepted: expected the number of jobs at once (> 0), or a number < 0 "
                "counting back from one per core (-1: one per core, the default)")
    batch = OmegaConf.select(config, "hydra.sweeper.max_batch_size")
    if batch is not None and batch < 1:
        return (f"hydra.sweeper.max_batch_size={batch} is not accepted: expected a whole number > 0 of jobs per batch, "
                "or null (every job in one batch, the default)")
    return None


def preset_sweep_problem(studies: list, parsed: list) -> str | None:
    """The first value of a study preset's sweep (its hydra.sweeper.params, or one set on the command line) that
    is not accepted, as one line; None if all are. `studies`: each study's composed config. A sweep whose key
    the command line sets is not run, and is not checked. Each value is checked against its study's config,
    without composing it again: a group's options are listed, any other value is set into the config and
    validated."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import OverrideParseException

    typed = {o.key_or_group for o in parsed}
    loader = GlobalHydra.instance().config_loader()
    for config in studies:
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        lines = [f"{key}={value}" for key, value in params.items() if key not in typed]
        try:
            sweeps = parse_overrides(lines)
        except OverrideParseException as error:
            return f"hydra.sweeper.params is not accepted: {first_line(error)}"
        problem = unknown_group_option(sweeps)
        if problem:
            return f"{problem} (a sweep of hydra.sweeper.params)"
        plain = OmegaConf.to_container(config)  # plain data: any value can be set into a copy, validate types it
        with as_first_job(config, multirun=True):  # the study's Hydra config; a preset's sweep runs only as one
            for sweep in sweeps:
                if loader.get_group_options(sweep.key_or_group):
                    continue  # a config group's option: checked above
                for value in sweep.sweep_iterator() if sweep.is_sweep_override() else [sweep.value()]:
                    trial = OmegaConf.create(plain)
                    OmegaConf.update(trial, sweep.key_or_group, value, force_add=True)
                    try:
                        validate(trial)
                    except PipelineError as error:  # names its key and value itself
                        return f"{error} (a sweep of hydra.sweeper.params)"
                    except Exception as error:  # noqa: BLE001 - a value of the wrong type, a key the schema lacks
                        return (f"{sweep.key_or_group}={value} is not accepted: {value_problem(error)} "
                                "(a sweep of hydra.sweeper.params)")
    return None
