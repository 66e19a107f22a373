"""A small disk cache for arrays the project derives from packaged data (the digits resized, their
stratified splits, Digits-M): computed once per machine and library version, then read in milliseconds
-- every run otherwise pays about a second to import scikit-learn and resize 1,797 images.

Files live in ``$VISREP_CACHE`` (default ``$XDG_CACHE_HOME/visrep`` or ``~/.cache/visrep``), one
``.npz`` per key, written atomically; ``VISREP_CACHE=off`` turns the cache off. The key holds the
function's name, its arguments and the versions of the packages the result depends on, so a new
scikit-learn, numpy or Pillow recomputes. An unreadable file is recomputed and replaced; a cache
directory that cannot be written is skipped silently (the result is the same, only slower).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import numpy as np

CACHE_VERSION = 1
_DEPENDS_ON = ("scikit-learn", "numpy", "pillow")


def cache_dir() -> Optional[Path]:
    value = os.environ.get("VISREP_CACHE", "").strip()
    if value.lower() in ("0", "off", "false", "no"):
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "visrep"


def _versions() -> dict:
    out = {}
    for name in _DEPENDS_ON:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cached_arrays(name: str, key: dict, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``compute()`` (a dict of arrays), or what an earlier call with the same ``name`` and ``key`` stored."""
    root = cache_dir()
    if root is None:
        return compute()
    blob = json.dumps({"name": name, "key": key, "versions": _versions(), "v": CACHE_VERSION}, sort_keys=True)
    path = root / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}.npz"
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception:  # noqa: BLE001 -- missing, partial or foreign file: compute it again
        pass
    out = compute()
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **out)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError:
        pass
    return out
