"""The ``visrep`` command line.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds a parser
and sets ``func`` (called with the parsed args; returns an exit code or None). Modules listed in
``COMMAND_MODULES`` are picked up when they exist, so a new command (``launch``, ``push``, ...) is
added by writing its module; installed plugins can also declare an entry point in the
``visrep.commands`` group pointing at such a ``register`` function.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata

COMMAND_MODULES = (
    "visrep.zoo.cli",       # zoo list|summary, viz gradcam|features|attention
    "visrep.launch.cli",    # launch (accelerate / DeepSpeed / SLURM)
    "visrep.launch.push",   # push (Hub export)
    "visrep.data.cli",
    "visrep.engine.cli",
)


def _registrars():
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                continue  # that command module is not written yet
            raise
        if hasattr(mod, "register"):
            yield mod.register
    try:
        eps = metadata.entry_points(group="visrep.commands")
    except Exception:  # pragma: no cover
        eps = []
    for ep in eps:
        yield ep.load()


def build_parser() -> argparse.ArgumentParser:
    from visrep import __version__
    parser = argparse.ArgumentParser(prog="visrep", description="visrep: visual representations, one backbone zoo.")
    parser.add_argument("--version", action="version", version=f"visrep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _registrars():
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        # a command group without its subcommand prints that group's help
        (getattr(args, "_parser", None) or parser).print_help()
        return 2 if args.command else 0
    rc = func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
