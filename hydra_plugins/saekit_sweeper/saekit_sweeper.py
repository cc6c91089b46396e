"""The basic sweeper with `groups`: a sweep that is the union of several grids, in one Hydra multirun.

The seed paper's frontier compares TopK over k with ReLU over λ: two grids, not one cartesian product. Each entry
of `hydra.sweeper.groups` is a grid (like `params`); the jobs are every group's product with `params` and the
command line, in order, each job once. With no groups it is Hydra's basic sweeper, so plugins such as
`hydra/sweeper=optuna` replace it as they replace the basic one.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser


@dataclass
class SaekitSweeperConf:
    _target_: str = "hydra_plugins.saekit_sweeper.saekit_sweeper.SaekitSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None
    """Settings swept in every job, as in Hydra's basic sweeper (`k: 4,8,16`)."""
    groups: Optional[List[Dict[str, Any]]] = None
    """Grids whose union is the sweep; each is crossed with `params` and the command line."""


ConfigStore.instance().store(group="hydra/sweeper", name="saekit", node=SaekitSweeperConf, provider="saekit")


class SaekitSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None,
                 groups: Optional[List[Dict[str, Any]]] = None) -> None:
        super().__init__(max_batch_size, params)
        self.groups = [dict(group) for group in groups or []]

    def split_arguments(self, overrides: List[Any], max_batch_size: Optional[int]) -> List[List[List[str]]]:  # type: ignore[override]
        """BasicSweeper.sweep hands over `params` then the command line, parsed: expand them with the groups."""
        from saekit.sweep import expand_jobs

        lines = [override.input_line for override in overrides]
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader if self.hydra_context else None)
        jobs = expand_jobs(lines[len(self.params):], self.params, self.groups, parser)
        if not max_batch_size:
            return [jobs]
        return [jobs[start:start + max_batch_size] for start in range(0, len(jobs), max_batch_size)]
