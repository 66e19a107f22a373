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
import importlib.util
import sys
from importlib import metadata

COMMAND_MODULES = (
    "visrep.zoo.cli",       # zoo list|summary, viz gradcam|features|attention
    "visrep.launch.push",   # push (Hub export)
    "visrep.data.cli",      # data pack|index|inspect (webdataset shards)
    "visrep.report.cli",    # report RUN_DIR [RUN_DIR ...] (HTML page of a run; several: overlaid curves)
)


# Commands whose module has its own parser and a ``main(argv)``: ``visrep NAME ARGS...`` is forwarded
# to ``module.main(ARGS)`` unchanged, so recipe arguments pass through the launcher untouched.
PASSTHROUGH_COMMANDS = {
    "launch": ("visrep.launch.accelerate_config", "launch a recipe (Accelerate / DeepSpeed / SLURM)"),
}


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _forward(command: str, argv: list[str]) -> int:
    module_name = PASSTHROUGH_COMMANDS[command][0]
    mod = importlib.import_module(module_name)
    fn = getattr(mod, "main", None)
    if fn is None:
        print(f"visrep {command}: {module_name} has no main(argv) yet", file=sys.stderr)
        return 2
    return int(fn(argv) or 0)


def _registrars():
    for name in COMMAND_MODULES:
        yield importlib.import_module(name).register
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
    for name, (module, help_text) in PASSTHROUGH_COMMANDS.items():
        if name not in sub.choices and _module_exists(module):
            sub.add_parser(name, help=f"{help_text} (visrep {name} --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user error ends in one ``visrep: error: ...`` line and exit status 2
    (``VISREP_DEBUG=1`` shows its traceback), see ``visrep.errors``."""
    from visrep.errors import run_cli

    return run_cli(_main, list(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    parser = build_parser()
    if argv and argv[0] in PASSTHROUGH_COMMANDS and _module_exists(PASSTHROUGH_COMMANDS[argv[0]][0]):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if sub.choices[argv[0]].get_default("func") is None:  # not claimed by a register() module
            return _forward(argv[0], argv[1:])
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
