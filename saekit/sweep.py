"""One tidy table over all jobs of a sweep (SPEC 5), with each job's status.

A job folder is any folder below the sweep folder holding Hydra's `.hydra/overrides.yaml`. A finished job
contributes its `results.csv` rows with `status=ok`; a failed or unfinished one contributes a single row
with `status=failed`, its error, and its swept settings, so nothing about it is lost.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import pandas as pd
import yaml

from saekit.fileutil import STATUS_FILE
from saekit.report import ID_COLUMNS, write_table

last_sweep = {"failed_jobs": 0}  # set by the CLI's sweep callback, read for the exit code


def parse_overrides(task_overrides: list[str]) -> dict[str, Any]:
    """`key=value` overrides as a dict with YAML-typed values (columns of the results table)."""
    parsed = {}
    for item in task_overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key == "logger" or key.startswith("logger."):  # where the run was tracked is not a result's setting
            continue
        try:
            parsed[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed[key] = value
        if isinstance(parsed[key], (list, dict)):
            parsed[key] = json.dumps(parsed[key])
    return parsed


def expand_jobs(arguments: Sequence[str], params: Optional[Mapping[str, Any]] = None,
                groups: Optional[Sequence[Mapping[str, Any]]] = None, parser: Any = None) -> list[list[str]]:
    """The jobs of a sweep, each a list of overrides: for every group, the cartesian product of `params`, the
    group's settings and the command line (later ones win for the same key); the groups' jobs one after the other,
    each distinct job once. Values use Hydra's sweep grammar (`4,8,16`, `range(4,12,4)`, `choice(a,b)`).

    Raises Hydra's OverrideParseException on a malformed override."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = parser or OverridesParser.create()
    as_lines = lambda mapping: [f"{key}={value}" for key, value in (mapping or {}).items()]  # noqa: E731
    jobs, seen = [], set()
    for group in groups or [{}]:
        overrides = parser.parse_overrides([*as_lines(params), *as_lines(group), *arguments])
        for job in BasicSweeper.split_arguments(overrides, None)[0]:
            if tuple(job) not in seen:
                seen.add(tuple(job))
                jobs.append(job)
    return jobs


def job_folders(sweep_dir: Path) -> list[Path]:
    return sorted(path.parent.parent for path in sweep_dir.glob("**/.hydra/overrides.yaml"))


def job_status(job: Path) -> tuple[str, str]:
    """("ok", "") for a finished job, ("failed", why) otherwise."""
    path = job / STATUS_FILE
    if not path.is_file():
        return "failed", "did not start training (no status.json)"
    facts = json.loads(path.read_text())
    if facts.get("status") == "done" and (job / "results.csv").is_file():
        return "ok", ""
    if facts.get("status") == "failed":
        return "failed", facts.get("error", "failed")
    return "failed", "did not finish (killed or still running)"


def job_rows(job: Path) -> pd.DataFrame:
    status, error = job_status(job)
    if status == "ok":
        frame = pd.read_csv(job / "results.csv")
    else:
        overrides = parse_overrides(yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or [])
        row = {column: overrides.get(column) for column in ID_COLUMNS}
        row.update(run_id=job.name, metric=None, value=None, **{k: v for k, v in overrides.items() if k not in row})
        frame = pd.DataFrame([row])
    frame["status"], frame["error"] = status, error or None
    return frame


def collect_sweep(sweep_dir: Path) -> pd.DataFrame:
    """The sweep table; raises FileNotFoundError when the folder holds no jobs."""
    jobs = job_folders(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"no Hydra job folders below {sweep_dir}")
    return pd.concat([job_rows(job) for job in jobs], ignore_index=True)


def write_sweep_table(sweep_dir: Path) -> pd.DataFrame:
    table = collect_sweep(sweep_dir)
    write_table(table, sweep_dir)
    return table
