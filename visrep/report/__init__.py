"""Seeing a run: ``visrep report RUN_DIR`` (also written at the end of every recipe, ``run.report``) --
one self-contained HTML page with the curves, results, config, confusion matrices, Grad-CAM and the
first training views; ``visrep report RUN_A RUN_B`` overlays runs' curves."""
from visrep.report.page import ReportWarning, build_report, compare_runs, log_images, report_run

__all__ = ["ReportWarning", "build_report", "compare_runs", "log_images", "report_run"]
