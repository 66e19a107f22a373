"""Validation of configuration values: the error type and the one-line check every config group's
``validate(prefix)`` uses. Imports nothing of ours but :mod:`visrep.errors`, so every layer (data, zoo
users, methods, engine, recipes) may use it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from visrep.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key or value is wrong; the message names it and says what is allowed."""

    same_on_every_rank = True


def existing(path: str | os.PathLike, error: type[Exception], message: str, directory_too: bool = False) -> Path:
    """``path`` as a :class:`Path` when it names a file (or, with ``directory_too``, a directory); else
    ``error(message)``, the message naming the path and what to pass instead."""
    path = Path(path)
    if not (path.exists() if directory_too else path.is_file()):
        raise error(message)
    return path


def check(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise a :class:`ConfigError` naming ``key`` and ``value`` and what is ``expected`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key '{key}' has value {value!r}; expected {expected}.")
