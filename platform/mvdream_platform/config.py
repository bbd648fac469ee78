"""The one configuration door: a library config dataclass from a plain mapping.

Every configuration that enters the library (a Hydra job's resolved config, a Serve
application's ``args``, a Tune trial's settings, a notebook's dict) becomes its dataclass here,
through OmegaConf's structured configs: the dataclass is the schema, unknown keys and values of
the wrong type are refused with the full dotted key, and the dataclasses' own ``__post_init__``
checks (ranges, choices) run as each part is constructed. Nothing downstream validates again.

    sds = build(SDSConfig, values["sds"], "sds")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

__all__ = ["ConfigError", "build"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that does not fit its schema; the message names the dotted key."""


def build(cls: type[T], values: Mapping[str, Any] | DictConfig | None, where: str) -> T:
    """``cls`` filled from ``values`` (nested mappings for nested dataclasses).

    Missing keys keep the dataclass defaults; YAML lists become tuples where the field's
    default is a tuple. Raises :class:`ConfigError` (a ``ValueError``) naming ``where.key`` for
    an unknown key, a value of the wrong type or a missing mandatory value, and the
    dataclasses' own ``ValueError`` for a value out of range.
    """
    schema = OmegaConf.structured(cls)
    try:
        merged = OmegaConf.merge(schema, values if values is not None else {})
        built = OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        parent, _, leaf = (err.full_key or "").rpartition(".")
        node = OmegaConf.select(schema, parent) if parent else schema
        allowed = sorted(node.keys()) if isinstance(node, DictConfig) else []
        path = f"{where}.{parent}" if parent else where
        raise ConfigError(f"unknown {path} keys [{leaf!r}]; allowed: {allowed}") from None
    except OmegaConfBaseException as err:
        key = f"{where}.{err.full_key}" if err.full_key else where
        message = str(err).splitlines()[0]
        raise ConfigError(f"{key}: {message}") from None
    return _tuples(built)


def _tuples(obj: Any) -> Any:
    """Lists back to tuples where the dataclass default is a tuple (OmegaConf has no tuples)."""
    if not dataclasses.is_dataclass(obj):
        return obj
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, list) and isinstance(f.default, tuple):
            object.__setattr__(obj, f.name, tuple(value))
        elif dataclasses.is_dataclass(value):
            _tuples(value)
    return obj
