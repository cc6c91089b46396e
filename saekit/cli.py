"""`saekit train|eval|cache|sweep|hooks`: the only module that imports Hydra.

Each command composes its top-level config from `conf/` (validated against saekit/config.py), turns it into
plain dataclasses once, and calls the library. Configuration mistakes are caught before Hydra creates a run
folder and reported as one line naming the setting; any `SaekitError` later on is reported the same way,
with a non-zero exit.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

COMMANDS = {
    "train": ("train", "train an SAE (builds the activation cache on demand), evaluate it, write results.csv"),
    "eval": ("eval", "every metric of an SAE: saekit eval ckpt=<run folder | sae.safetensors | SAELens or sparsify "
                     "folder | Gemma Scope .npz | OpenAI .pt>"),
    "cache": ("cache", "build or reuse the activation caches (layer=[0,1,...]: one model pass); cache verify <folder> re-hashes one"),
    "sweep": ("train", "a Hydra multirun of `train`, e.g. saekit sweep k=8,16,32"),
    "hooks": ("cache", "list the hook points of a model: saekit hooks model=stories260k"),
    "report": ("", "Pareto plots, progressive-code curves, a power-law fit and report.md: saekit report <sweep folder>"),
    "inspect": ("inspect", "a static dashboard of an SAE's latents (or format=json): saekit inspect ckpt=<run folder>"),
    "export": ("export", "write an SAE as a SAELens or sparsify folder: saekit export ckpt=<run> format=saelens out=<folder>"),
    "import": ("import", "a SAELens/sparsify folder, Gemma Scope .npz or OpenAI .pt as a saekit checkpoint: "
                         "saekit import <file or folder> out=<folder>"),
}
_PLAIN_COMMANDS = ("hooks", "export", "import")
"""Commands that write no Hydra run folder: they print, or write only the folder they are given."""
EXIT_USER_ERROR = 2
FILE_ONLY = {"console": False}
"""`extra=` for a log record meant for the job log file alone (saekit.logs' console handler skips it)."""
log = logging.getLogger("saekit.cli")
_HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve", "--shell-completion", "-sc")


def conf_dir() -> Path:
    """`conf/` ships inside the wheel as saekit/conf; in a source checkout it sits beside the package."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def _usage() -> str:
    lines = ["usage: saekit <command> [key=value ...] [hydra flags]", "", "commands:"]
    lines += [f"  {name:<6} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "`saekit <command> --help` lists the config groups and settings; `--cfg job` prints the composed config."]
    return "\n".join(lines)


def _fail(message: str) -> None:
    print(f"saekit: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


# ---- one-line messages for Hydra / OmegaConf errors ------------------------------------------------
def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def describe_config_error(exc: BaseException) -> str:
    """Turn a Hydra/OmegaConf composition error into one line naming the setting and the fix."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

    chain, cause = [], exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for error in chain:
        if isinstance(error, MissingConfigException) and error.options is not None:
            group, _, wanted = (error.missing_cfg_file or "").rpartition("/")
            return f"{group}={wanted} is not an option; use one of: {', '.join(sorted(error.options))}"
        if isinstance(error, MissingMandatoryValue):
            key = getattr(error, "full_key", "") or _first_line(error)
            return f"{key} is required; set it on the command line ({key}=...)"
        if isinstance(error, (ConfigKeyError, ConfigAttributeError)):
            key = getattr(error, "full_key", "") or getattr(error, "key", "")
            return f"{key} is not a saekit setting; check the spelling (`saekit <command> --cfg job` shows all settings)"
        if isinstance(error, OmegaConfBaseException) and getattr(error, "full_key", None):
            return f"{error.full_key}: {_first_line(getattr(error, 'msg', error))}"
    return _first_line(exc).rstrip(".") + " (see `saekit <command> --help`)"


def _added_key(override: str) -> Optional[str]:
    """The key a `+key=value` / `++key=value` override adds to the config; None for anything else (plain
    overrides, deletions, Hydra's own settings, a config group appended by name such as `+experiment=x`)."""
    if not override.startswith("+"):
        return None
    key = override.lstrip("+").partition("=")[0].partition("@")[0].strip()
    if not key or key == "hydra" or key.startswith("hydra.") or (conf_dir() / key.replace(".", "/")).is_dir():
        return None
    return key


def _has_setting(typed: Any, key: str) -> bool:
    """Whether the dotted `key` names a field of the typed config (any key inside a free-form dict field)."""
    import dataclasses

    node = typed
    for part in key.split("."):
        if isinstance(node, dict):
            return True
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True


def refuse_unknown_additions(typed: Any, overrides: list[str]) -> None:
    """Hydra's `+key=value` adds a key the schema lacks, and OmegaConf then drops it without a word (only the results
    table showed it, as a column): a key that is not a setting is a misspelling, so it is refused in one line."""
    from saekit.errors import ConfigError

    for override in overrides:
        key = _added_key(override)
        if key is not None and not _has_setting(typed, key):
            raise ConfigError(f"{override.partition('=')[0]}: {key} is not a saekit setting; drop the + and check the "
                              f"spelling (`saekit <command> --cfg job` lists the settings)")


# ---- composing and converting -----------------------------------------------------------------
def _register() -> None:
    from omegaconf import OmegaConf

    from saekit.config import register_schemas

    register_schemas()
    if not OmegaConf.has_resolver("saekit_dirname"):
        OmegaConf.register_new_resolver("saekit_dirname", run_dirname)


_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-+@%")


def run_dirname(override_dirname: str) -> str:
    """A folder name from the command's overrides (Hydra joins them as `k-32__activation-topk`): same command →
    same folder (and resume). Only characters Hydra reads unquoted are kept, so the folder can be passed back as
    `ckpt=<folder>` or `hydra.run.dir=<folder>` as it is; list values keep their items (`layer-0.1.2`)."""
    name = override_dirname.replace(os.sep, "_").replace(",", ".").replace(":", "-")
    name = "".join(char for char in name if char not in "[]{}()'\" ")
    name = "".join(char if char in _NAME_CHARS else "_" for char in name) or "default"
    if len(name) > 120:
        import hashlib

        name = name[:100] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


def to_dataclass(cfg) -> Any:
    """DictConfig → the schema's dataclass (runs every __post_init__ check)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg)


@dataclass(frozen=True)
class ConfigSource:
    """Where Hydra finds the primary config: `-cn/--config-name`, `-cp/--config-path`, `-cd/--config-dir`."""

    name: str
    path: str = ""
    """The primary config folder; empty: saekit's conf/."""
    extra_dir: str = ""
    """A folder added to the search path (Hydra's -cd)."""

    def primary_dir(self) -> str:
        """Where Hydra's compose API looks for the primary config: Hydra's main reads -cd's folder for it too."""
        if self.path:
            return self.path
        if self.extra_dir and any((Path(self.extra_dir) / f"{self.name}{ext}").is_file() for ext in (".yaml", ".yml")):
            return self.extra_dir
        return str(conf_dir())

    def search_path(self, for_compose: bool) -> list[str]:
        """`hydra.searchpath` for this source: saekit's conf/ beside a -cp folder (so a config there can extend
        `train`); for the compose API also the -cd folder (hydra.main takes that one as --config-dir)."""
        folders = [str(conf_dir()), *([self.extra_dir] if for_compose and self.extra_dir else [])]
        folders = [folder for folder in folders if folder != (self.primary_dir() if for_compose else self.path or
                                                               str(conf_dir()))]
        return [f"hydra.searchpath=[{','.join('file://' + folder for folder in folders)}]"] if folders else []


@contextmanager
def _composing(source: ConfigSource) -> Iterator[Callable[..., Any]]:
    """Hydra's compose API for one command's config source; yields compose(overrides, **kwargs)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=source.primary_dir(), version_base="1.3"):
            yield lambda overrides, **kwargs: compose(config_name=source.name,
                                                      overrides=[*overrides, *source.search_path(for_compose=True)],
                                                      **kwargs)
    finally:
        GlobalHydra.instance().clear()


def _task_overrides(overrides: list[str]) -> list[str]:
    return [item for item in overrides if not item.lstrip("+~").startswith(("hydra.", "hydra/"))]


def preflight(config_name: str, overrides: list[str], source: Optional[ConfigSource] = None) -> Any:
    """Compose and validate before Hydra creates any folder, so bad input leaves nothing behind."""
    from saekit.errors import SaekitError

    try:
        with _composing(source or ConfigSource(config_name)) as compose:
            return to_dataclass(compose(_task_overrides(overrides)))
    except SaekitError as exc:
        _fail(str(exc))
    except Exception as exc:  # Hydra and OmegaConf raise many types; all are configuration mistakes here
        _fail(describe_config_error(exc))


_GRID_SWEEPERS = ("SaekitSweeper", "BasicSweeper")


def preflight_sweep(source: ConfigSource, overrides: list[str]) -> list[list[str]]:
    """Every job of a multirun, composed and typed before Hydra creates the sweep folder.

    A malformed override or a job whose settings do not compose (an unknown key, `k=abc`, a misspelled `+key`) is
    refused in one line: nothing runs, nothing is written. A value that composes but fails saekit's checks
    (`k=600` with n=512) stays that job's failure, recorded in the sweep table while the other jobs run. With a
    sweeper that picks the values itself (Optuna, Nevergrad), the settings outside its search are checked.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from saekit.sweep import expand_jobs

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        _fail(f"cannot read the overrides: {_first_line(exc)} (values with spaces, = or , need quotes)")
    task = _task_overrides(overrides)
    fixed = [item.input_line for item in parsed if not item.is_sweep_override()]
    with _composing(source) as compose:
        try:
            sweeper = compose(fixed, return_hydra_config=True).hydra.sweeper
            jobs = expand_jobs(task, sweeper.get("params"), sweeper.get("groups")) \
                if str(sweeper.get("_target_", "")).endswith(_GRID_SWEEPERS) else [_task_overrides(fixed)]
        except Exception as exc:  # composing runs no value checks: what fails here is the config's shape
            _fail(describe_config_error(exc))
        for job in jobs:
            _check_sweep_job(compose, job)
    return jobs


def _check_sweep_job(compose: Callable[..., Any], job: list[str]) -> None:
    from saekit.errors import ConfigError, SaekitError

    try:
        typed = to_dataclass(compose(job))
    except SaekitError:
        return  # a value check: this job fails alone when it runs
    except Exception as exc:
        _fail(f"sweep job {' '.join(job)}: {describe_config_error(exc)}")
    try:
        refuse_unknown_additions(typed, job)
    except ConfigError as exc:
        _fail(str(exc))


def _absolute(path: str) -> str:
    candidate = Path(path).expanduser()
    return str(candidate.resolve()) if candidate.exists() else path


def absolutize_paths(cfg) -> None:
    """Local model and data paths become absolute, so a saved config works from any folder."""
    if getattr(cfg, "model", None) is not None:
        cfg.model.name = _absolute(cfg.model.name)
    if getattr(cfg, "data", None) is not None:
        cfg.data.paths = [_absolute(p) for p in cfg.data.paths]
        cfg.data.eval_paths = [_absolute(p) for p in cfg.data.eval_paths]


# ---- running a task ---------------------------------------------------------------------------
def _keeps_nothing(run_dir: Path) -> bool:
    """A run folder with only Hydra's bookkeeping in it (safe to remove after a failed start)."""
    from saekit.runlock import LOCK_FILE

    return run_dir.is_dir() and all(p.name in (".hydra", LOCK_FILE) or p.suffix == ".log" for p in run_dir.iterdir())


_HYDRA_SUBDIR = ".hydra"
_GUARDED_FILES = ("config.json", "status.json")


def _guarded(task: Callable[[Any, Path], Any], cfg) -> Any:
    """Run a task holding its run folder's lock, with Ctrl-C/SIGTERM stopping training at a checkpoint.

    A busy folder is refused in one line naming the other process (exit 2), or waited for (lock_wait_s). Hydra's
    own `.hydra/` files are written here, not by Hydra (conf/hydra/saekit.yaml sets output_subdir: null), so a
    refused rerun can put back the ones it replaced: a refusal leaves the folder byte for byte as it was.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from saekit.distributed import World
    from saekit.errors import SaekitError
    from saekit.runlock import RunLock
    from saekit.stopping import Interrupted, TrainingInterrupted, stop_on_signals

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if not World.from_env().is_main:  # a data-parallel rank > 0: rank 0 holds the folder and writes in it
        with stop_on_signals():
            try:
                return task(cfg, run_dir)
            except (TrainingInterrupted, Interrupted) as exc:  # rank 0 says it, and where to resume from
                sys.exit(exc.exit_code)
            except SaekitError as exc:
                _fail(f"rank {World.from_env().rank}: {exc}")
    command = f"saekit {hydra_cfg.job.name} {' '.join(hydra_cfg.overrides.task)}".strip()
    lock = RunLock(run_dir, command, float(OmegaConf.select(cfg, "lock_wait_s", default=0) or 0))
    try:
        with stop_on_signals():  # Ctrl-C while waiting for the lock is one line too
            try:
                lock.acquire()
            except SaekitError as exc:
                if hydra_cfg.mode == RunMode.MULTIRUN:  # the folder is another process's: write nothing there
                    print(f"saekit: job skipped ({run_dir.name}): {exc}", file=sys.stderr)
                    return None  # no value: a sweeper plugin (Optuna) records a failed trial
                _fail(str(exc))
            with _hydra_files(run_dir, cfg):
                return _run_task(task, cfg, run_dir)
    except (TrainingInterrupted, Interrupted) as exc:
        message = str(exc) if isinstance(exc, TrainingInterrupted) else "interrupted; run the same command to resume"
        print(f"saekit: {message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    finally:
        lock.release()


@contextmanager
def _hydra_files(run_dir: Path, cfg) -> Iterator[None]:
    """Write `.hydra/{config,hydra,overrides}.yaml` as Hydra would; put the previous ones back when the task stops
    having changed neither config.json nor status.json (a refusal), so the folder keeps describing its run. The job
    log is cut back to where it was too (it holds the run's history, not the refused command's)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    folder = run_dir / _HYDRA_SUBDIR
    new = {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(HydraConfig.instance().cfg),
           "overrides.yaml": OmegaConf.to_yaml(HydraConfig.get().overrides.task)}
    before = {name: _read_bytes(folder / name) for name in new}
    guarded = {name: _read_bytes(run_dir / name) for name in _GUARDED_FILES}
    logs = {path: path.stat().st_size for path in run_dir.glob("*.log")}
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in new.items():
        (folder / name).write_text(text, encoding="utf-8")
    try:
        yield
    except BaseException:
        untouched = all(_read_bytes(run_dir / name) == data for name, data in guarded.items())
        if untouched and any(data is not None for data in before.values()):
            for name, data in before.items():
                if data is None:
                    (folder / name).unlink(missing_ok=True)
                else:
                    (folder / name).write_bytes(data)
            for path, size in logs.items():
                os.truncate(path, size)
        raise


def _read_bytes(path: Path) -> Optional[bytes]:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _run_task(task: Callable[[Any, Path], Any], cfg, run_dir: Path) -> Any:
    """Run a task and return its result; a SaekitError becomes one line on stderr and exit code 2.

    In a sweep, a failing job is recorded in its folder's status.json (with the error) and the sweep goes on; it
    returns no objective, which sweeper plugins record as a failed trial. Tracebacks of errors that are not the user's
    (a bug) go to the run folder's job log (`<command>.log`), never only to the terminal.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from saekit.errors import SaekitError
    from saekit.fileutil import write_status
    from saekit.stopping import TrainingInterrupted

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        try:
            return _with_disk_errors(task, cfg, run_dir, "hydra.sweep.dir")
        except TrainingInterrupted:  # Ctrl-C stops the sweep, not just this job
            raise
        except Exception as exc:  # one job's failure, whatever it is, must not stop the others
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if not isinstance(exc, SaekitError):
                message = f"{type(exc).__name__}: {message}"
                log.error("job %s failed", run_dir.name, exc_info=True, extra=FILE_ONLY)
            write_status(run_dir, "failed", error=message)
            print(f"saekit: job failed ({run_dir.name}): {message}", file=sys.stderr)
            return None  # no value: a sweeper plugin (Optuna) records a failed trial
    try:
        return _with_disk_errors(task, cfg, run_dir, "hydra.run.dir")
    except SaekitError as exc:
        if _keeps_nothing(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        _fail(str(exc))
    except Exception:
        log.error("%s failed", run_dir, exc_info=True, extra=FILE_ONLY)
        raise


def _with_disk_errors(task: Callable[[Any, Path], Any], cfg, run_dir: Path, setting: str) -> Any:
    """A full, read-only or forbidden run folder is the user's to fix: one line naming the folder and the fix."""
    from saekit.fileutil import disk_error, is_disk_error

    try:
        return task(cfg, run_dir)
    except OSError as exc:
        if not is_disk_error(exc, run_dir):
            raise
        raise disk_error(exc, setting, run_dir) from exc


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency; this keeps `import saekit.cli` cheap to reason about
    _HydraCallback = object


class SweepTableCallback(_HydraCallback):
    """After a multirun: one results table over all its jobs, with a status column (conf/hydra/saekit.yaml).

    The failed-job count goes to `saekit.sweep.last_sweep`, which `main` reads for the exit code (this class may
    be loaded twice, as `saekit.cli` by Hydra and as `__main__` under `python -m saekit.cli`).
    """

    def on_multirun_end(self, config, **kwargs) -> None:
        from saekit.sweep import last_sweep, write_sweep_table

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            table = write_sweep_table(sweep_dir)
        except FileNotFoundError:
            return
        except Exception as exc:  # Hydra would turn this into a warning nobody sees
            print(f"saekit: error: could not write the sweep table in {sweep_dir}: {exc}", file=sys.stderr)
            last_sweep["failed_jobs"] = -1
            return
        jobs = table.drop_duplicates("run_id")
        last_sweep["failed_jobs"] = int((jobs["status"] != "ok").sum())
        print(f"sweep: {len(jobs)} jobs, {last_sweep['failed_jobs']} failed; table: {sweep_dir / 'results.csv'}")


def _hydra_run(source: ConfigSource, task: Callable[[Any, Path], Any]) -> None:
    import hydra

    @hydra.main(config_path=source.path or str(conf_dir()), config_name=source.name, version_base="1.3")
    def entry(cfg) -> Any:
        return _guarded(task, cfg)

    entry()


_PATH_KEYS = ("ckpt", "hydra.run.dir", "hydra.sweep.dir", "cache.dir", "src", "out")
_SPECIAL = set("=,[]{}()'\" ")


def quote_path_values(args: list[str]) -> list[str]:
    """Quote path-valued overrides so Hydra reads saekit's own run folders (`activation=topk,k=32`) as one path."""
    quoted = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in _PATH_KEYS and value[:1] not in ("'", '"') and _SPECIAL & set(value):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        quoted.append(f"{key}{sep}{value}")
    return quoted


_FLAGS_WITH_VALUE = ("--cfg", "-c", "--info", "-i", "--package", "-p", "--shell-completion", "-sc", "--config-name", "-cn",
                     "--config-path", "-cp", "--config-dir", "-cd", "--experimental-rerun")
_MULTIRUN_FLAGS = ("-m", "--multirun")
_SOURCE_FLAGS = {"--config-name": "name", "-cn": "name", "--config-path": "path", "-cp": "path", "--config-dir": "extra_dir",
                 "-cd": "extra_dir"}


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides): Hydra's parser wants the flags first; users write them anywhere.

    An override never starts with `-` (`~key` deletes one), so every such word is a flag; `--flag=value` and
    `--flag value` are both read."""
    flags, overrides, index = [], [], 0
    while index < len(args):
        arg = args[index]
        if arg.startswith("-"):
            flags.append(arg)
            takes_value = arg in _FLAGS_WITH_VALUE and index + 1 < len(args) and "=" not in args[index + 1] \
                and not args[index + 1].startswith("-")
            if takes_value:
                flags.append(args[index + 1])
                index += 1
        else:
            overrides.append(arg)
        index += 1
    return flags, overrides


def config_source(flags: list[str], default_name: str) -> tuple[ConfigSource, list[str]]:
    """The config source named by -cn/-cp/-cd, and the other flags (for Hydra). Folders are made absolute: Hydra
    would read a relative --config-path from saekit's package folder, not from where the command runs."""
    found, passed, index = {"name": default_name}, [], 0
    while index < len(flags):
        flag, sep, value = flags[index].partition("=")
        if flag in _SOURCE_FLAGS:
            if not sep:
                index += 1
                if index >= len(flags):
                    _fail(f"{flag} needs a value (e.g. {flag} <{_SOURCE_FLAGS[flag].replace('_', ' ')}>)")
                value = flags[index]
            field = _SOURCE_FLAGS[flag]
            if field != "name":
                value = str(Path(value).expanduser().resolve())
                if not Path(value).is_dir():
                    _fail(f"{flag} {value}: not a folder; pass the folder that holds your config files")
            found[field] = value
            if field == "extra_dir":
                passed += [flag, value]
        else:
            passed.append(flags[index])
        index += 1
    return ConfigSource(**found), passed


def _is_info_request(flags: list[str]) -> bool:
    """--help, --cfg job, --info, ...: Hydra prints and runs nothing."""
    return any(flag.split("=")[0] in _HYDRA_FLAGS for flag in flags)


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    command, rest = argv[0], quote_path_values(argv[1:])
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; use one of: {', '.join(COMMANDS)}")
    if command == "import":
        rest = quote_path_values(_positional_source(rest))
    if command == "report":
        return _report(rest)
    if command == "cache" and rest[:1] == ["verify"]:
        return _verify_cache(rest[1:])
    _register()
    flags, overrides = split_flags(rest)
    multirun = command == "sweep" or any(flag in _MULTIRUN_FLAGS for flag in flags)
    flags = [flag for flag in flags if flag not in _MULTIRUN_FLAGS]
    source, flags = config_source(flags, COMMANDS[command][0])
    overrides = [_experiment_spelling(item) if multirun else item for item in overrides]
    if multirun and command not in ("train", "sweep"):
        _fail(f"-m/--multirun sweeps `saekit train`; use saekit sweep <settings> (not saekit {command} -m)")
    if multirun and _world_or_fail().enabled:
        _fail("a sweep cannot run under torchrun or srun; launch each data-parallel training with its own torchrun "
              "(or sbatch scripts/slurm/train_ddp.sbatch)")
    if multirun:
        jobs = preflight_sweep(source, overrides)
        if any(flag.split("=")[0] in ("--cfg", "-c") for flag in flags):
            hydra_overrides = [item for item in overrides if item not in _task_overrides(overrides)]
            return _print_sweep_jobs(source, jobs, _cfg_part(flags), hydra_overrides)
    elif not _is_info_request(flags):
        checked = preflight(source.name, overrides, source)
        _refuse_or_fail(checked, overrides)
        if command in _PLAIN_COMMANDS:
            return _run_plain_command(command, checked)
        with _process_group(command, checked):
            return _launch(command, source, flags, overrides, multirun)
    _launch(command, source, flags, overrides, multirun)


@contextmanager
def _process_group(command: str, checked: Any) -> Iterator[None]:
    """Under torchrun (WORLD_SIZE > 1), `train` joins the ranks' process group for its length (NCCL on CUDA, gloo
    on the CPU); other commands are refused there. Outside torchrun, nothing."""
    from saekit.distributed import start_process_group
    from saekit.errors import SaekitError
    from saekit.model import resolve_device

    world = _world_or_fail()
    if not world.enabled:
        yield
        return
    if command != "train":
        _fail(f"saekit {command} runs in one process; under torchrun only `train` is data-parallel")
    try:
        start_process_group(world, resolve_device(checked.device).type, checked.dist_timeout_s)
    except SaekitError as exc:
        _fail(str(exc))
    try:
        yield
    finally:
        import torch.distributed

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _world_or_fail():
    from saekit.distributed import World
    from saekit.errors import SaekitError

    try:
        return World.from_env()
    except SaekitError as exc:
        _fail(str(exc))


@contextmanager
def _hydra_argv(argv: list[str]) -> Iterator[None]:
    """`hydra.main` reads its arguments only from sys.argv: hand them over for the run, then put the caller's back
    (main(argv) called from Python leaves the process as it found it)."""
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def _launch(command: str, source: ConfigSource, flags: list[str], overrides: list[str], multirun: bool) -> None:
    from saekit import tasks
    from saekit.sweep import last_sweep

    task = {"train": tasks.train, "sweep": tasks.train, "eval": tasks.evaluate, "cache": tasks.cache,
            "hooks": tasks.hooks}.get(command)
    if command == "inspect":  # its modules load only for its own runs
        from saekit.inspect.run import inspect as task
    # Hydra's parser wants its flags before the overrides.
    hydra_argv = [f"saekit-{command}", *(["--multirun"] if multirun else []), *flags, f"hydra.job.name={command}",
                  *source.search_path(for_compose=False), *overrides]
    last_sweep["failed_jobs"] = 0
    with _hydra_argv(hydra_argv), warnings.catch_warnings():
        # Libraries' UserWarnings (transformer-lens, torch) drown the one-line output; only for this command's run.
        warnings.simplefilter("ignore", UserWarning)
        try:
            with _hydra_errors_raised():
                _hydra_run(source, lambda cfg, run_dir: _run_and_score(task, cfg, run_dir))
        except Exception as exc:
            _fail(_launch_error(exc))
    if multirun and last_sweep["failed_jobs"] < 0:
        sys.exit(1)
    if multirun and last_sweep["failed_jobs"]:
        _fail(f"{last_sweep['failed_jobs']} sweep job(s) failed (status and error in the sweep's results.csv); "
              f"fix them and run the same command again: finished jobs are not retrained")


@contextmanager
def _hydra_errors_raised() -> Iterator[None]:
    """Hydra prints an error that escapes the app (a launcher's, such as sbatch refusing a job) as a traceback and
    exits 1; with HYDRA_FULL_ERROR it raises it instead, so saekit can say it in one line. Set for the command's
    run only, then put back."""
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


def _launch_error(exc: Exception) -> str:
    """One line for an error Hydra's run raised outside any job; a bug is raised again, traceback and all."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if type(exc).__name__ == "FailedJobError":  # submitit's: the scheduler refused the submission
        return (f"the scheduler refused the sweep: {_first_line(exc)} (a cluster without GPUs needs "
                f"hydra.launcher.gpus_per_node=0; check hydra.launcher.partition, cpus_per_task and mem_gb)")
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return describe_config_error(exc)
    raise exc


def _run_and_score(task: Callable[[Any, Path], Any], cfg, run_dir: Path) -> Union[None, float, list[float]]:
    """Run the task; for training, return the `objective` metric, which sweeper plugins (Optuna, Nevergrad, Ax)
    minimize or maximize."""
    typed = _prepare(cfg)
    return objective_value(typed, task(typed, run_dir))


def objective_value(cfg: Any, result: Any) -> Union[None, float, list[float]]:
    """The held-out value of `cfg.objective` (default nmse; a list of names gives a list of values) from a training
    result, the mean over hooks when one run trained several. None for commands that train nothing, and when a
    value is missing or NaN: Optuna's sweeper records None as a failed trial but stops the whole search on NaN."""
    import math

    names = getattr(cfg, "objective", None)
    if names is None or not isinstance(result, dict) or not result:
        return None
    per_hook = list(result.values()) if all(isinstance(value, dict) for value in result.values()) else [result]

    def mean_of(name: str) -> float:
        values = [float(metrics[name]) for metrics in per_hook if name in metrics]
        return sum(values) / len(values) if values else float("nan")

    values = [mean_of(name) for name in ([names] if isinstance(names, str) else names)]
    if any(math.isnan(value) for value in values):
        return None
    return values[0] if isinstance(names, str) else values


def _refuse_or_fail(typed: Any, overrides: list[str]) -> None:
    from saekit.errors import SaekitError

    try:
        refuse_unknown_additions(typed, overrides)
    except SaekitError as exc:
        _fail(str(exc))


def experiments() -> list[str]:
    return sorted(path.stem for path in (conf_dir() / "experiment").glob("*.yaml"))


def _experiment_spelling(override: str) -> str:
    """`sweep=<preset>`, the spelling before experiments were a config group, still names one."""
    key, sep, name = override.partition("=")
    if key != "sweep" or not sep:
        return override
    if name not in experiments():
        _fail(f"sweep={name} is not a preset; use one of: {', '.join(experiments())}")
    return f"+experiment={name}"


def _cfg_part(flags: list[str]) -> str:
    """The value of --cfg/-c: job, hydra or all (Hydra's choices)."""
    for index, flag in enumerate(flags):
        name, sep, value = flag.partition("=")
        if name in ("--cfg", "-c"):
            value = value if sep else (flags[index + 1] if index + 1 < len(flags) else "")
            if value not in ("job", "hydra", "all"):
                _fail(f"--cfg {value or '(nothing)'}: use --cfg job, --cfg hydra or --cfg all")
            return value
    return "job"


def _print_sweep_jobs(source: ConfigSource, jobs: list[list[str]], part: str = "job",
                      hydra_overrides: Optional[list[str]] = None) -> None:
    """`--cfg` for a sweep (Hydra refuses --cfg with --multirun): every job's composed config (`job`), the Hydra
    config the sweep runs under, launcher and sweeper included (`hydra`, once), or both per job (`all`)."""
    from omegaconf import OmegaConf

    hydra_overrides = hydra_overrides or []
    with _composing(source) as compose:
        if part == "hydra":
            print(OmegaConf.to_yaml(compose([*hydra_overrides, *jobs[0]], return_hydra_config=True).hydra))
            return
        for index, job in enumerate(jobs):
            print(f"# job {index}: {' '.join(job)}")
            composed = compose([*hydra_overrides, *job], return_hydra_config=part == "all")
            print(OmegaConf.to_yaml(composed))


def _positional_source(args: list[str]) -> list[str]:
    """`saekit import <file or folder> out=...`: the one word that is neither an override nor a flag is `src=`."""
    words = [arg for arg in args if "=" not in arg and not arg.startswith("-")]
    if len(words) > 1:
        _fail(f"import takes one file or folder; got {len(words)}: {' '.join(words)}")
    return [f"src={arg}" if arg in words else arg for arg in args]


def _run_plain_command(command: str, checked: Any) -> None:
    """hooks prints; export and import write only the folder named by out= (no run folder, no log file)."""
    from saekit import tasks

    absolutize_paths(checked)
    if command == "hooks":
        return _run_plain(tasks.hooks, checked, Path("."))
    from saekit.formats.run import export, import_sae

    _run_plain(export if command == "export" else import_sae, checked)


def _report(args: list[str]) -> None:
    from saekit.sweep_report import write_report

    if len(args) != 1 or args[0].startswith("-"):
        _fail("report takes one sweep folder: saekit report <folder> (the hydra.sweep.dir of a sweep)")
    folder = Path(args[0].strip("'\"")).expanduser()
    if not folder.is_dir():
        _fail(f"report: {folder} is not a folder; pass the hydra.sweep.dir of a sweep")
    path = _run_plain(write_report, folder)
    print(f"report: {path} (plots beside it)")


def _verify_cache(args: list[str]) -> None:
    """`saekit cache verify <cache folder>`: exit 0 when every file matches its manifest, 2 naming the first that does not."""
    from saekit.tasks import verify_cache

    if len(args) != 1 or args[0].startswith("-") or "=" in args[0]:
        _fail("cache verify takes one cache folder: saekit cache verify <cache.dir>/<key>")
    folder = Path(args[0].strip("'\"")).expanduser()
    if not folder.is_dir():
        _fail(f"cache verify: {folder} is not a folder; pass one cache folder (<cache.dir>/<key>)")
    _run_plain(verify_cache, folder)


def _run_plain(function: Callable[..., Any], *args: Any) -> Any:
    """A command that runs outside Hydra (no run folder): its log lines go to the terminal for its length, and a
    SaekitError is one line."""
    from saekit.errors import SaekitError
    from saekit.logs import console_handler

    handler, logger = console_handler(), logging.getLogger("saekit")
    saved_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return function(*args)
    except SaekitError as exc:
        _fail(str(exc))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)


def _prepare(cfg):
    """DictConfig → dataclass with absolute paths and the command-line overrides recorded."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    typed = to_dataclass(cfg)
    absolutize_paths(typed)
    if hasattr(typed, "overrides"):
        from saekit.sweep import parse_overrides

        task_overrides = list(HydraConfig.get().overrides.task)
        refuse_unknown_additions(typed, task_overrides)  # sweep jobs skip main's check
        typed.overrides = parse_overrides(task_overrides)
    if HydraConfig.get().mode == RunMode.MULTIRUN and getattr(typed, "logger", None) and typed.logger.group is None:
        typed.logger.group = Path(HydraConfig.get().sweep.dir).name  # a sweep's jobs side by side in the tracker
    return typed


if __name__ == "__main__":
    main()
