"""Name → SAE class, so each variant is one file and configs name them instead of import paths."""

from __future__ import annotations

from saekit.errors import ConfigError

REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make `cls` buildable as `activation=<cls.name>`."""
    REGISTRY[cls.name] = cls
    return cls


def sae_class(name: str) -> type:
    if name not in REGISTRY:
        raise ConfigError(f"activation={name!r} is not a known SAE; use one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
