"""Checkpoints you can trust: a manifest written last, verified before anything is loaded.

A checkpoint directory (``RUN_DIR/checkpoints/STAGE/step_N``) or a stage's export
(``RUN_DIR/models/STAGE``) is written into a temporary directory; when every file is in place, a
``manifest.json`` listing each file's size and SHA-256 is written last and the directory is renamed
into place. On resume, the newest checkpoint whose files all match their manifest is used: a
truncated, deleted or altered file (a crash mid-copy, a full disk, a flaky network file system) is
reported by path and the run falls back to the previous intact checkpoint.

Writes that fail for lack of space or permission become a :class:`~visrep.errors.DiskWriteError`
naming the directory; the temporary directory is removed and older checkpoints stay as they were.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from visrep.engine.io import atomic_write_json, replace_dir
from visrep.errors import DiskWriteError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
CHECKPOINT_PREFIX = "step_"
_CHUNK = 1 << 22


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: str | os.PathLike) -> dict:
    """Record every file under ``root`` (size, SHA-256) in ``root/manifest.json``, written last."""
    root = Path(root)
    files = {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(root)}
    manifest = {"version": MANIFEST_VERSION, "files": files}
    atomic_write_json(root / MANIFEST, manifest)
    return manifest


def verify(root: str | os.PathLike) -> Optional[str]:
    """``None`` if every file in ``root``'s manifest is present with its size and checksum, else
    what is wrong (the first problem found)."""
    root = Path(root)
    if not root.is_dir():
        return "the directory does not exist"
    mf = root / MANIFEST
    if not mf.is_file():
        return f"it has no {MANIFEST} (written last: the write did not finish, or an older visrep wrote it)"
    try:
        files = json.loads(mf.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({e})"
    for rel, want in files.items():
        p = root / rel
        if not p.is_file():
            return f"'{rel}' is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"'{rel}' has {size} bytes, the manifest says {want['size']}"
    for rel, want in files.items():  # sizes first: cheap, and they catch truncation without hashing
        if _sha256(root / rel) != want["sha256"]:
            return f"'{rel}' does not match its checksum"
    return None


def list_checkpoints(stage_dir: Path) -> list[Path]:
    """Checkpoint directories of a stage, oldest first (damaged ones included: see :func:`verify`)."""
    if not stage_dir.is_dir():
        return []
    found = [p for p in stage_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def newest_intact(candidates: list[Path], warn: Callable[[str], None]) -> tuple[Optional[Path], list[str]]:
    """The newest directory of ``candidates`` (oldest first) that verifies; each damaged one newer than it
    is reported through ``warn``. Returns (choice or None, the problems found)."""
    problems = []
    for path in reversed(candidates):
        reason = verify(path)
        if reason is None:
            return path, problems
        problems.append(f"'{path}': {reason}")
        warn(f"checkpoint '{path}' is damaged ({reason}); falling back to the previous one")
    return None, problems


# ----------------------------------------------------------------------------------------------
# Writing: failures that are the disk's, not the program's
# ----------------------------------------------------------------------------------------------
_WRITE_FAILURE_TEXT = ("no space left", "disk quota", "read-only file system", "file write failed",
                       "permission denied", "os error")


def is_write_failure(exc: BaseException) -> bool:
    """A failure to write to disk (rather than a bug): an ``OSError``, or a library's wrapper of one
    (safetensors' ``SafetensorError``, torch's ``PytorchStreamWriter failed writing``)."""
    if isinstance(exc, OSError):
        return True
    text = str(exc).lower()
    return any(t in text for t in _WRITE_FAILURE_TEXT)


def write_failure(exc: BaseException, what: str, directory: Path, hint: str) -> DiskWriteError:
    text = str(exc).strip()
    reason = getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
    free = ""
    try:
        free = f"; {shutil.disk_usage(directory if directory.exists() else directory.parent).free / 2**20:.1f} MiB free there"
    except OSError:
        pass
    return DiskWriteError(f"could not write the {what} in '{directory}': {reason}{free}. {hint}")


def write_dir_atomically(final: Path, write: Callable[[Path], None], *, writer: bool, barrier: Callable[[], None],
                         what: str, hint: str) -> None:
    """Write ``final`` as a whole: ``write(tmp)`` fills a temporary sibling directory (on every rank;
    ``writer`` says whether this one owns the files), the manifest is written last, then ``tmp`` is
    renamed to ``final``. On failure the temporary directory is removed and ``final`` is untouched;
    a disk failure becomes a :class:`DiskWriteError` naming the directory."""
    tmp = final.with_name(f".tmp-{final.name}")
    try:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        write(tmp)
        barrier()  # every rank has written its part (RNG states, shards) before the manifest
        if writer:
            write_manifest(tmp)
            replace_dir(tmp, final)
    except BaseException as e:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_write_failure(e):
            raise write_failure(e, what, final.parent, hint) from e
        raise
