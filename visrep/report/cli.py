"""``visrep report RUN_DIR`` (one run's page) and ``visrep report RUN_A RUN_B ...`` (curves overlaid)."""
from __future__ import annotations

from pathlib import Path

from visrep.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="an HTML page of a run (curves, results, config, confusion, Grad-CAM, training views)",
        description="One run: RUN_DIR/report/index.html. Several runs: their curves overlaid, one line per run "
                    "(labelled by the run directory's name), and their results side by side.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    p.add_argument("--out", default=None, help="directory of the comparison page (default: RUN_A/report/compare)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from visrep.report import build_report, compare_runs

    for d in args.run_dirs:
        if not (Path(d) / "metrics.jsonl").is_file() and not (Path(d) / "config.yaml").is_file():
            raise UserError(f"'{d}' is not a run directory (no metrics.jsonl, no config.yaml). Pass the "
                            f"--output-dir of a recipe run.")
    if len(args.run_dirs) == 1:
        page = build_report(args.run_dirs[0])
    else:
        page = compare_runs(args.run_dirs, args.out)
    print(f"wrote {page}")
    return 0
