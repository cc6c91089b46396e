"""`saekit train|eval|cache|sweep|hooks`: the only module that imports Hydra.

Each command composes its top-level config from `conf/` (validated against saekit/config.py), turns it into
plain dataclasses once, and calls the library. Configuration mistakes are caught before Hydra creates a run
folder and reported as one line naming the setting; any `SaekitError` later on is reported the same way,
with a non-zero exit.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

COMMANDS = {
    "train": ("train", "train an SAE (builds the activation cache on demand), evaluate it, write results.csv"),
    "eval": ("eval", "recompute the metrics of a trained SAE: saekit eval ckpt=<run folder | sae.safetensors>"),
    "cache": ("cache", "build or reuse the activation caches (layer=[0,1,...]: one model pass); cache verify <folder> re-hashes one"),
    "sweep": ("train", "a Hydra multirun of `train`, e.g. saekit sweep k=8,16,32"),
    "hooks": ("cache", "list the hook points of a model: saekit hooks model=stories260k"),
    "report": ("", "Pareto plots, progressive-code curves, a power-law fit and report.md: saekit report <sweep folder>"),
}
EXIT_USER_ERROR = 2
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


def run_dirname(override_dirname: str) -> str:
    """A folder name from the command's overrides: same command → same folder (and resume)."""
    name = override_dirname.replace(os.sep, "_").replace("[", "").replace("]", "").replace("'", "") or "default"
    if len(name) > 120:
        import hashlib

        name = name[:100] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


def to_dataclass(cfg) -> Any:
    """DictConfig → the schema's dataclass (runs every __post_init__ check)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg)


def preflight(config_name: str, overrides: list[str]) -> Any:
    """Compose and validate before Hydra creates any folder, so bad input leaves nothing behind."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from saekit.errors import SaekitError

    task_overrides = [item for item in overrides if not item.startswith(("hydra.", "+hydra.", "~hydra."))]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return to_dataclass(compose(config_name=config_name, overrides=task_overrides))
    except SaekitError as exc:
        _fail(str(exc))
    except Exception as exc:  # Hydra and OmegaConf raise many types; all are configuration mistakes here
        _fail(describe_config_error(exc))
    finally:
        GlobalHydra.instance().clear()


def _absolute(path: str) -> str:
    candidate = Path(path).expanduser()
    return str(candidate.resolve()) if candidate.exists() else path


def absolutize_paths(cfg) -> None:
    """Local model and data paths become absolute, so a saved config works from any folder."""
    cfg.model.name = _absolute(cfg.model.name)
    if cfg.data is not None:
        cfg.data.paths = [_absolute(p) for p in cfg.data.paths]
        cfg.data.eval_paths = [_absolute(p) for p in cfg.data.eval_paths]


# ---- running a task ---------------------------------------------------------------------------
def _keeps_nothing(run_dir: Path) -> bool:
    """A run folder with only Hydra's bookkeeping in it (safe to remove after a failed start)."""
    from saekit.runlock import LOCK_FILE

    return run_dir.is_dir() and all(p.name in (".hydra", LOCK_FILE) or p.suffix == ".log" for p in run_dir.iterdir())


_HYDRA_SUBDIR = ".hydra"
_GUARDED_FILES = ("config.json", "status.json")


def _guarded(task: Callable[[Any, Path], None], cfg) -> None:
    """Run a task holding its run folder's lock, with Ctrl-C/SIGTERM stopping training at a checkpoint.

    A busy folder is refused in one line naming the other process (exit 2), or waited for (lock_wait_s). Hydra's
    own `.hydra/` files are written here, not by Hydra (conf/hydra/saekit.yaml sets output_subdir: null), so a
    refused rerun can put back the ones it replaced: a refusal leaves the folder byte for byte as it was.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from saekit.errors import SaekitError
    from saekit.runlock import RunLock
    from saekit.stopping import Interrupted, TrainingInterrupted, stop_on_signals

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    command = f"saekit {hydra_cfg.job.name} {' '.join(hydra_cfg.overrides.task)}".strip()
    lock = RunLock(run_dir, command, float(OmegaConf.select(cfg, "lock_wait_s", default=0) or 0))
    try:
        with stop_on_signals():  # Ctrl-C while waiting for the lock is one line too
            try:
                lock.acquire()
            except SaekitError as exc:
                if hydra_cfg.mode == RunMode.MULTIRUN:  # the folder is another process's: write nothing there
                    print(f"saekit: job skipped ({run_dir.name}): {exc}", file=sys.stderr)
                    return
                _fail(str(exc))
            with _hydra_files(run_dir, cfg):
                _run_task(task, cfg, run_dir)
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


def _run_task(task: Callable[[Any, Path], None], cfg, run_dir: Path) -> None:
    """Run a task; a SaekitError becomes one line on stderr and exit code 2.

    In a sweep, a failing job is recorded in its folder's status.json (with the error) and the sweep goes on.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from saekit.errors import SaekitError
    from saekit.fileutil import write_status
    from saekit.stopping import TrainingInterrupted

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        try:
            task(cfg, run_dir)
        except TrainingInterrupted:  # Ctrl-C stops the sweep, not just this job
            raise
        except Exception as exc:  # one job's failure, whatever it is, must not stop the others
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if not isinstance(exc, SaekitError):
                message = f"{type(exc).__name__}: {message}"
            write_status(run_dir, "failed", error=message)
            print(f"saekit: job failed ({run_dir.name}): {message}", file=sys.stderr)
        return
    try:
        task(cfg, run_dir)
    except SaekitError as exc:
        if _keeps_nothing(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        _fail(str(exc))


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


def _hydra_run(config_name: str, task: Callable[[Any, Path], None]) -> None:
    import hydra

    @hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")
    def entry(cfg) -> None:
        _guarded(task, cfg)

    entry()


_PATH_KEYS = ("ckpt", "hydra.run.dir", "hydra.sweep.dir", "cache.dir")
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


_FLAGS_WITH_VALUE = ("--cfg", "-c", "--info", "-i", "--package", "-p", "--shell-completion", "-sc")


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides): Hydra's parser wants the flags first; users write them anywhere."""
    flags, overrides, index = [], [], 0
    while index < len(args):
        arg = args[index]
        if arg.split("=")[0] in _HYDRA_FLAGS or arg in ("--package", "-p"):
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


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    command, rest = argv[0], quote_path_values(argv[1:])
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; use one of: {', '.join(COMMANDS)}")
    if command == "report":
        return _report(rest)
    if command == "cache" and rest[:1] == ["verify"]:
        return _verify_cache(rest[1:])
    if command == "sweep" and any(arg.startswith("sweep=") for arg in rest):
        return _preset_sweep(rest)
    config_name = COMMANDS[command][0]
    _register()
    wants_hydra_flag = any(arg.split("=")[0] in _HYDRA_FLAGS for arg in rest)
    multirun = command == "sweep"
    if multirun and any(arg in ("--cfg", "-c") for arg in rest):
        return _print_sweep_jobs([rest])
    if not wants_hydra_flag and not multirun:
        checked = preflight(config_name, rest)
        _refuse_or_fail(checked, rest)
        if command == "hooks":  # prints only: no run folder, no log file
            from saekit import tasks

            absolutize_paths(checked)
            return _run_plain(tasks.hooks, checked)
    from saekit import tasks

    task = {"train": tasks.train, "sweep": tasks.train, "eval": tasks.evaluate, "cache": tasks.cache,
            "hooks": tasks.hooks}[command]
    # Hydra's parser wants its flags before the overrides.
    flags, overrides = split_flags(rest)
    hydra_argv = [f"saekit-{command}", *(["--multirun"] if multirun else []), *flags, f"hydra.job.name={command}",
                  *overrides]
    with _hydra_argv(hydra_argv), warnings.catch_warnings():
        # Libraries' UserWarnings (transformer-lens, torch) drown the one-line output; only for this command's run.
        warnings.simplefilter("ignore", UserWarning)
        _hydra_run(config_name, lambda cfg, run_dir: task(_prepare(cfg), run_dir))
    from saekit.sweep import last_sweep

    if multirun and last_sweep["failed_jobs"] < 0:
        sys.exit(1)
    if multirun and last_sweep["failed_jobs"]:
        _fail(f"{last_sweep['failed_jobs']} sweep job(s) failed (status and error in the sweep's results.csv); "
              f"fix them and run the same command again: finished jobs are not retrained")


def _refuse_or_fail(typed: Any, overrides: list[str]) -> None:
    from saekit.errors import SaekitError

    try:
        refuse_unknown_additions(typed, overrides)
    except SaekitError as exc:
        _fail(str(exc))


def _preset_sweep(args: list[str]) -> None:
    """`saekit sweep sweep=<preset>`: each group of conf/sweep/<preset>.yaml is one Hydra multirun, all into one
    sweep folder (default outputs/sweeps/<preset>, so the same command resumes), then one table over all jobs."""
    import subprocess

    import yaml

    name = next(arg for arg in args if arg.startswith("sweep=")).partition("=")[2]
    presets = sorted(path.stem for path in (conf_dir() / "sweep").glob("*.yaml"))
    if name not in presets:
        _fail(f"sweep={name} is not a preset; use one of: {', '.join(presets)}")
    preset = yaml.safe_load((conf_dir() / "sweep" / f"{name}.yaml").read_text())
    rest = [arg for arg in args if not arg.startswith("sweep=")]
    if not any(arg.startswith("hydra.sweep.dir=") for arg in rest):
        rest.append(f"hydra.sweep.dir=outputs/sweeps/{name}")
    if any(arg in ("--cfg", "-c") for arg in rest):
        return _print_sweep_jobs([[*preset.get("common", []), *group, *rest] for group in preset["groups"]])
    failed = 0
    for group in preset["groups"]:
        command = [sys.executable, "-m", "saekit.cli", "sweep", *preset.get("common", []), *group, *rest]
        failed += subprocess.run(command).returncode != 0
    if failed:
        _fail(f"sweep={name}: {failed} of {len(preset['groups'])} groups had failures (see the sweep's results.csv); "
              f"run the same command again to retry them")


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The jobs of a basic-sweeper multirun: the cartesian product of comma-separated values (lists kept whole)."""
    jobs: list[list[str]] = [[]]
    for item in overrides:
        key, sep, value = item.partition("=")
        choices = value.split(",") if sep and "," in value and not value.startswith(("[", "{", "'", '"')) else [value]
        jobs = [job + [f"{key}{sep}{choice}" if sep else item] for job in jobs for choice in choices]
    return jobs


def _print_sweep_jobs(groups: list[list[str]]) -> None:
    """`--cfg job` for a sweep: compose and print every job's config (Hydra refuses --cfg with --multirun)."""
    from omegaconf import OmegaConf

    _register()
    index = 0
    for group in groups:
        flags, overrides = split_flags(group)
        overrides = [arg for arg in overrides if not arg.startswith(("hydra.", "+hydra."))]
        for job in expand_sweep(overrides):
            checked = preflight("train", job)
            print(f"# job {index}: {' '.join(job)}")
            print(OmegaConf.to_yaml(OmegaConf.structured(checked)))
            index += 1


def _report(args: list[str]) -> None:
    from saekit.errors import SaekitError
    from saekit.sweep_report import write_report

    if len(args) != 1 or args[0].startswith("-"):
        _fail("report takes one sweep folder: saekit report <folder> (the hydra.sweep.dir of a sweep)")
    folder = Path(args[0].strip("'\"")).expanduser()
    if not folder.is_dir():
        _fail(f"report: {folder} is not a folder; pass the hydra.sweep.dir of a sweep")
    try:
        path = write_report(folder)
    except SaekitError as exc:
        _fail(str(exc))
    print(f"report: {path} (plots beside it)")


def _verify_cache(args: list[str]) -> None:
    """`saekit cache verify <cache folder>`: exit 0 when every file matches its manifest, 2 naming the first that does not."""
    from saekit.errors import SaekitError
    from saekit.tasks import verify_cache

    if len(args) != 1 or args[0].startswith("-") or "=" in args[0]:
        _fail("cache verify takes one cache folder: saekit cache verify <cache.dir>/<key>")
    folder = Path(args[0].strip("'\"")).expanduser()
    if not folder.is_dir():
        _fail(f"cache verify: {folder} is not a folder; pass one cache folder (<cache.dir>/<key>)")
    try:
        verify_cache(folder)
    except SaekitError as exc:
        _fail(str(exc))


def _run_plain(task: Callable[[Any, Path], None], cfg) -> None:
    from saekit.errors import SaekitError

    try:
        task(cfg, Path("."))
    except SaekitError as exc:
        _fail(str(exc))


def _prepare(cfg):
    """DictConfig → dataclass with absolute paths and the command-line overrides recorded."""
    from hydra.core.hydra_config import HydraConfig

    typed = to_dataclass(cfg)
    if hasattr(typed, "model"):
        absolutize_paths(typed)
    if hasattr(typed, "overrides"):
        from saekit.sweep import parse_overrides

        task_overrides = list(HydraConfig.get().overrides.task)
        refuse_unknown_additions(typed, task_overrides)  # sweep jobs skip main's check
        typed.overrides = parse_overrides(task_overrides)
    return typed


if __name__ == "__main__":
    main()
