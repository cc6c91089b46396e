"""Name → SAE variant, each with its own typed settings: a new variant is one Python file and one YAML.

A variant file holds a config dataclass (subclass of `VariantConfig`) and the SAE class, decorated with
`@register`. Registering makes `activation=<name>` buildable, and gives Hydra the config's schema as
`schema/activation/<name>`, which `conf/activation/<name>.yaml` lists in its defaults so that the variant's
knobs are typed and checked when the command line is composed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from saekit.errors import ConfigError, require

REGISTRY: dict[str, type] = {}


@dataclass
class VariantConfig:
    """Settings every variant has; a variant's own config subclasses this and adds its knobs (with defaults).

    Range checks go in `check` (run on construction) and raise ConfigError naming `activation.<field>`;
    checks that need the run's n or k go in `check_run`.
    """

    name: str = ""
    """Registry name of the variant (`activation=<name>`)."""
    learned_scale: bool = False
    """Any activation: a learned per-latent scale s, z <- s * z (removes feature suppression)."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Range checks of this variant's knobs (override, calling super().check())."""

    def check_run(self, n: int, k: int) -> None:
        """Checks that need the run's dictionary size n and k (e.g. Matryoshka's group sizes sum to n)."""

    def knobs(self) -> dict[str, Any]:
        """The variant's settings as a flat dict (what checkpoints store beside the run-level spec)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LatentParam:
    """A tensor whose first axis indexes latents, and what a revived (resampled) latent's entry becomes.

    reset: the value written to a revived latent's entries; None where the resampler sets them itself
    (the encoder and decoder directions). Adam's moments of every parameter in the table are zeroed too.
    """

    reset: Optional[float]


def register(cls: type) -> type:
    """Class decorator: make `cls` buildable as `activation=<cls.name>`, typed by `cls.Config`."""
    config = cls.__dict__.get("Config")
    if not (isinstance(config, type) and issubclass(config, VariantConfig)):
        raise TypeError(f"SAE variant {cls.__name__} must define `Config`, a VariantConfig subclass")
    if not cls.name:
        raise TypeError(f"SAE variant {cls.__name__} must set `name`")
    REGISTRY[cls.name] = cls
    return cls


def sae_class(name: str) -> type:
    if name not in REGISTRY:
        raise ConfigError(f"activation={name!r} is not a known SAE; use one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def config_fields(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(sae_class(name).Config)}


def variant_config(name: str, knobs: Optional[dict] = None, strict: bool = True) -> VariantConfig:
    """The typed settings of variant `name` from a dict of knobs.

    strict: an unknown knob is a ConfigError naming it; otherwise knobs that belong to other variants are
    ignored (checkpoints of saekit 0.1 stored every variant's knobs in one flat spec).
    """
    knobs = {key: value for key, value in (knobs or {}).items() if key != "name"}
    fields = config_fields(name)
    unknown = sorted(set(knobs) - fields)
    if strict and unknown:
        raise ConfigError(f"activation.{unknown[0]} is not a setting of activation={name}; it has: "
                          f"{', '.join(sorted(fields - {'name'}))}")
    return sae_class(name).Config(name=name, **{key: value for key, value in knobs.items() if key in fields})


def as_variant_config(value: Any) -> VariantConfig:
    """A VariantConfig from what a config holds: the object itself, or a dict with `name` (a saved config)."""
    if isinstance(value, VariantConfig):
        return value
    if isinstance(value, dict) or hasattr(value, "items"):
        knobs = dict(value.items())
        require("name" in knobs, "activation has no name; use activation=<variant>, e.g. activation=topk")
        return variant_config(str(knobs["name"]), knobs)
    raise ConfigError(f"activation={value!r} is not a variant config; use activation=<variant>, e.g. activation=topk")


def register_schemas() -> None:
    """Every variant's config as `schema/activation/<name>` in Hydra's ConfigStore (typed composition)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, cls in REGISTRY.items():
        store.store(group="schema/activation", name=name, node=cls.Config(name=name))
