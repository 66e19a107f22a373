"""Validation of configuration values: the error type and the one-line check every config group's
``validate(prefix)`` uses. Imports nothing of ours but :mod:`visrep.errors`, so every layer (data, zoo
users, methods, engine, recipes) may use it."""
from __future__ import annotations

from typing import Any

from visrep.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key or value is wrong; the message names it and says what is allowed."""

    same_on_every_rank = True


def check(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise a :class:`ConfigError` naming ``key`` and ``value`` and what is ``expected`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key '{key}' has value {value!r}; expected {expected}.")
