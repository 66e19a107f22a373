"""User errors and the one way a command ends on them.

A *user error* is something the person running a command can fix -- a bad config value, an unreadable
image, a diverging run, an unreachable download, a full disk, a damaged checkpoint. It ends the command
with one line on stderr (``visrep: error: ...`` naming the key, file or step and what to do) and a
non-zero exit status, without a traceback. Anything else is a programming error and keeps its
traceback. ``VISREP_DEBUG=1`` shows the traceback for user errors too.

An exception class is a user error when it derives from :class:`UserError` or carries the class
attribute ``user_error = True`` (the zoo imports nothing of ours, so its errors use the attribute).
This module imports nothing of visrep's: every package may use it.
"""
from __future__ import annotations

import errno
import os
import re
import sys
from typing import Any, Callable

EXIT_USER_ERROR = 2
EXIT_REQUEUE = 75  # EX_TEMPFAIL (sysexits.h): "try again later" -- the job stopped on request and can resume
EXIT_INTERRUPTED = 130

# errors of the file system the user can act on (free space, fix permissions, pick another directory)
USER_OS_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class UserError(Exception):
    """Base of errors the user can fix. ``same_on_every_rank``: every process of a job raises it alike
    (a config error), so only rank 0 reports it."""

    user_error = True
    same_on_every_rank = False
    exit_code = EXIT_USER_ERROR


class DataError(UserError, ValueError):
    """A data set, captions file or column is not what the config says."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory named by the user does not exist."""


class MissingKeyError(UserError, KeyError):
    """A named item (column, split, backbone) does not exist; the message lists what does."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(UserError):
    """A checkpoint (or exported model) to resume from is missing, incomplete or damaged."""


class DiskWriteError(UserError):
    """A checkpoint, export or run file could not be written (disk full, quota, read-only, permissions)."""


class Preempted(Exception):
    """The job was asked to stop (SIGTERM / SIGUSR1, e.g. a scheduler's time limit): a checkpoint was
    written and the command exits with :data:`EXIT_REQUEUE` so that a scheduler can requeue it."""

    exit_code = EXIT_REQUEUE


def is_user_error(exc: BaseException) -> bool:
    if getattr(type(exc), "user_error", False):
        return True
    return isinstance(exc, OSError) and exc.errno in USER_OS_ERRNOS


def debug_enabled() -> bool:
    return os.environ.get("VISREP_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def message_of(exc: BaseException) -> str:
    """The one-line (or few-line) user-facing text of ``exc``."""
    if isinstance(exc, OSError) and not getattr(type(exc), "user_error", False):
        what = f" '{exc.filename}'" if exc.filename else ""
        hint = {errno.ENOSPC: "free space on that disk or choose another --output-dir",
                errno.EDQUOT: "free space within your quota or choose another --output-dir",
                errno.EROFS: "choose a writable --output-dir",
                }.get(exc.errno, "fix its permissions or choose another --output-dir")
        return f"cannot write{what}: {exc.strerror or exc}. {hint[0].upper() + hint[1:]}."
    text = str(exc)
    # An error raised in a DataLoader worker comes back as "Caught X in DataLoader worker process N.
    # Original Traceback ...": keep the worker's own message (the last line of that traceback).
    if "\nOriginal Traceback" in text:
        tail = [l for l in text.splitlines() if l.strip()]
        last = tail[-1] if tail else text
        text = re.sub(rf"^([\w.]+\.)?{re.escape(type(exc).__name__)}: ", "", last)
    return text or type(exc).__name__


def report(exc: BaseException, prog: str = "visrep") -> int:
    """Print ``exc`` as a user error (once per job) and return the exit status to use."""
    code = int(getattr(exc, "exit_code", EXIT_USER_ERROR))
    rank = _rank()
    if rank != 0 and getattr(exc, "same_on_every_rank", False):
        return code
    where = f" [rank {rank}]" if rank != 0 else ""
    print(f"{prog}: error{where}: {message_of(exc)}", file=sys.stderr, flush=True)
    return code


def run_cli(fn: Callable[..., Any], *args: Any, prog: str = "visrep") -> int:
    """Call ``fn(*args)`` the way a command should end: 0 on success; a user error, preemption or
    Ctrl-C as one message and its exit status; a programming error with its traceback."""
    try:
        rc = fn(*args)
        return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0
    except Preempted as e:
        if _rank() == 0:
            print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 -- sorted into user and programming errors here
        if debug_enabled() or not is_user_error(e):
            raise
        return report(e, prog)


def main_entry(fn: Callable[..., Any], prog: str = "visrep") -> None:
    """``if __name__ == "__main__": main_entry(main)`` -- run ``fn(sys.argv[1:])`` and exit with its status."""
    code = run_cli(fn, sys.argv[1:], prog=prog)
    sys.stdout.flush()
    sys.exit(code)
