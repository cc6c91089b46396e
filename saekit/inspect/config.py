"""`saekit inspect`'s schema: a plain dataclass (Hydra registers it as `inspect_schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from saekit.config import DEVICES, ForeignSite
from saekit.errors import ConfigError, check_choice, require

FORMATS = ("html", "json")


@dataclass
class InspectSettings:
    """What is collected per latent and how much of it is shown (`inspect.*` on the command line)."""

    tokens: int = 262144
    """Tokens inspected, in whole windows of the held-out text (the training corpus's held-out split by default)."""
    latents: Any = None
    """Latents that get a page: null for all, a count N for the first N, or a list of ids ([3, 17, 42]). The index and
    the statistics always cover every latent."""
    contexts: int = 20
    """Top-activating contexts kept per latent (one per window: the window's strongest token)."""
    quantiles: int = 4
    """Activation-quantile bins whose contexts are shown besides the top ones (0: none)."""
    quantile_contexts: int = 5
    """Contexts per quantile bin; the uniform reservoir keeps quantiles × quantile_contexts windows per latent."""
    ctx_left: int = 12
    """Tokens shown (with their activations) before a context's highlighted token."""
    ctx_right: int = 4
    """Tokens shown after it."""
    batch_windows: int = 64
    """Windows per forward pass (lowered automatically so one batch's latents stay under 64 MB)."""
    neighbours: int = 10
    """Nearest latents by decoder cosine listed per latent page."""
    logits: int = 10
    """Top positive and top negative logit effects listed per latent page."""
    seed: int = 0
    """Seed of the quantile reservoir's sampling keys."""

    def __post_init__(self) -> None:
        for name in ("tokens", "contexts", "batch_windows"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"inspect.{name}={value} must be a positive integer")
        for name in ("quantiles", "quantile_contexts", "ctx_left", "ctx_right", "neighbours", "logits"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 0, f"inspect.{name}={value} must be an integer >= 0")
        require(self.quantiles == 0 or self.quantile_contexts > 0,
                f"inspect.quantile_contexts={self.quantile_contexts} must be positive when inspect.quantiles > 0; "
                f"set inspect.quantiles=0 for no quantile contexts")
        self.latents = _latent_selection(self.latents)

    @property
    def reservoir(self) -> int:
        """Windows kept per latent by the uniform sample the quantile bins are drawn from."""
        return self.quantiles * self.quantile_contexts

    @property
    def ctx_width(self) -> int:
        return self.ctx_left + 1 + self.ctx_right


def _latent_selection(value: Any) -> Any:
    """None, a positive count, or a list of distinct ids >= 0 (any sequence, e.g. an OmegaConf ListConfig)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"inspect.latents={value} is not valid; use null (all), a count N, or a list of ids")
    if isinstance(value, int):
        require(value > 0, f"inspect.latents={value} must be a positive count, a list of ids, or null for all")
        return value
    try:
        ids = [int(item) for item in value]
    except (TypeError, ValueError):
        raise ConfigError(f"inspect.latents={value!r} is not valid; use null (all), a count N, or a list of ids "
                          f"such as [0,5,9]") from None
    require(bool(ids) and all(i >= 0 for i in ids) and len(set(ids)) == len(ids),
            f"inspect.latents={ids} must be a non-empty list of distinct ids >= 0 (or null for all)")
    return ids


@dataclass
class InspectConfig(ForeignSite):
    """`saekit inspect`: a static dashboard (format=html) or Neuronpedia-style JSON (format=json) of one SAE."""

    ckpt: str = MISSING
    """A run folder or a checkpoint file (`sae.safetensors`), or any foreign SAE file `saekit eval` reads."""
    device: str = "auto"
    format: str = "html"
    """`html`: index.html, latent.html and data/ in the run folder; `json`: features/*.json (docs/inspect.md)."""
    inspect: InspectSettings = field(default_factory=InspectSettings)
    lock_wait_s: float = 0.0
    """Seconds to wait for another process using the same run folder to finish; 0 refuses at once."""

    def __post_init__(self) -> None:
        check_choice("device", self.device, DEVICES)
        check_choice("format", self.format, FORMATS)
        if isinstance(self.inspect, dict):  # built from a plain mapping (a notebook, a test)
            self.inspect = InspectSettings(**self.inspect)
