"""The report page: one self-contained HTML file plus PNGs in ``RUN_DIR/report/``. Every figure is
optional: one that cannot be made is a warning and is left out; the page is always written."""
from __future__ import annotations

import html
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from visrep.report import curves, figures

log = logging.getLogger(__name__)
REPORT_DIR = "report"
PAGE = "index.html"


class ReportWarning(UserWarning):
    """A figure of the report could not be made; the rest of the report (and the run) goes on."""


class _Page:
    def __init__(self, out: Path, title: str):
        self.out, self.title = out, title
        self.sections: list[str] = []
        self.images: dict[str, Path] = {}  # name -> PNG, for trackers that take images
        self.skipped: list[str] = []

    def figure(self, what: str, make: Callable[[], Any]) -> Any:
        """``make()``; an exception becomes a warning and a note on the page."""
        try:
            return make()
        except Exception as e:  # noqa: BLE001 -- a report never fails a run
            msg = f"report: {what} skipped: {type(e).__name__}: {e}"
            warnings.warn(msg, ReportWarning, stacklevel=2)
            self.skipped.append(f"{what}: {type(e).__name__}: {e}")
            return None

    def add(self, heading: str, body: str) -> None:
        self.sections.append(f"<h2>{html.escape(heading)}</h2>\n{body}")

    def img(self, path: Path, name: Optional[str] = None) -> str:
        if name:
            self.images[name] = path
        rel = path.relative_to(self.out).as_posix()
        return f'<p><img src="{html.escape(rel)}" alt="{html.escape(path.stem)}"></p>'

    def write(self) -> Path:
        skipped = ""
        if self.skipped:
            skipped = "<h2>Not shown</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in self.skipped) + "</ul>"
        text = (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>\n"
                f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(self.title)}</h1>\n"
                + "\n".join(self.sections) + skipped
                + f"\n<p class='foot'>written by visrep report, {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
                + "</body></html>\n")
        path = self.out / PAGE
        path.write_text(text)
        return path


_CSS = ("body{font-family:sans-serif;max-width:1300px;margin:1em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "img{max-width:100%}pre{background:#f6f6f6;padding:.6em;font-size:12px;max-height:30em;overflow:auto}"
        ".foot{color:#888;font-size:11px}")


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows) + "</table>")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _no_series():
    raise figures.NotAvailable("metrics.jsonl holds no numeric series")


def _curve_sections(page: _Page, runs: dict[str, Path]) -> None:
    series = {label: curves.read_series(d) for label, d in runs.items()}
    stages = []
    for s in series.values():
        stages += [k for k in s if k not in stages]
    if not stages:
        page.figure("curves", _no_series)
        return
    body = []
    for stage in stages:
        per_run = {label: s[stage] for label, s in series.items() if stage in s}
        path = page.figure(f"curves of stage '{stage}'", lambda: curves.plot_stage(
            stage, per_run, page.out / f"curves_{_safe(stage)}.png"))
        if path is not None:
            body.append(page.img(path, f"report/curves_{stage}"))
    page.add("Curves", "\n".join(body))


def build_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report/index.html`` (and its PNGs): the curves of every stage (every numeric
    series in metrics.jsonl), the results table, the resolved config, for every classifier export the
    test confusion matrix, the most-confused pairs and Grad-CAM / attention maps, and a grid of the
    first training views: the first batch as the model received it when the recipe recorded it (SSL: every
    view; CLIP: images with their captions), else epoch 0's rebuilt from the config. Returns the page's
    path; a figure that cannot be made is a :class:`ReportWarning` and is left out."""
    run_dir = Path(run_dir)
    page = _Page(run_dir / REPORT_DIR, f"visrep run {run_dir.name}")
    page.out.mkdir(parents=True, exist_ok=True)
    recipe = figures.recipe_name(run_dir)
    if recipe:
        page.sections.append(f"<p>recipe: <b>{html.escape(recipe)}</b> &nbsp; directory: {html.escape(str(run_dir))}</p>")
    _curve_sections(page, {run_dir.name: run_dir})

    results = page.figure("results table", lambda: json.loads((run_dir / "results.json").read_text()))
    if results is not None:
        page.add("Results", _table(list(results.items()), ("figure", "value")))

    exports = page.figure("classifier exports", lambda: figures.classifier_exports(run_dir)) or []
    cache: dict = {}  # the rebuilt data, shared by stages trained on the same data
    for i, (stage, path, mcfg) in enumerate(exports):
        _classifier_section(page, run_dir, stage, path, mcfg, cache, explain=i == len(exports) - 1)

    grid = page.figure("training views", lambda: _training_grid(page, run_dir, cache))
    if grid is not None:
        page.add(*grid)

    config = page.figure("config", lambda: (run_dir / "config.yaml").read_text())
    if config is not None:
        page.add("Resolved config", f"<pre>{html.escape(config)}</pre>")
    return page.write()


def _classifier_section(page: _Page, run_dir: Path, stage: str, path: Path, mcfg: dict, cache: dict,
                        explain: bool) -> None:
    """Confusion matrix and most-confused pairs; with ``explain`` (the run's last classifier: its final
    model) Grad-CAM / attention maps too."""
    def evaluate():
        model = figures.load_classifier(path)
        data = figures.rebuild_data(run_dir, stage, mcfg["data_config"], cache)
        return model, data, figures.test_predictions(model, data)

    got = page.figure(f"test predictions of models/{stage}", evaluate)
    if got is None:
        return
    model, data, (x, y, pred) = got
    classes = [str(c) for c in data.classes] or [str(i) for i in range(mcfg["num_classes"])]
    body = []

    def confusion():
        m = figures.confusion_matrix(y, pred, len(classes))
        p = figures.plot_confusion(m, classes, f"models/{stage}", page.out / f"confusion_{_safe(stage)}.png")
        pairs = figures.most_confused(m, classes)
        table = _table(pairs, ("true", "predicted as", "images")) if pairs else "<p>no test image confused</p>"
        return page.img(p, f"report/confusion_{stage}") + "<p>most confused pairs:</p>" + table

    body.append(page.figure(f"confusion matrix of models/{stage}", confusion) or "")

    def explanations():
        k = min(figures.MAX_CAM_IMAGES, len(x))
        p, what = figures.plot_explanations(model, x[:k], y[:k], classes, mcfg["data_config"],
                                            page.out / f"explain_{_safe(stage)}.png")
        return f"<p>{html.escape(what)} on the first test images</p>" + page.img(p)

    if explain:
        body.append(page.figure(f"Grad-CAM / attention of models/{stage}", explanations) or "")
    page.add(f"Classifier models/{stage}", "\n".join(body))


def _training_grid(page: _Page, run_dir: Path, cache: dict) -> tuple[str, str]:
    """(heading, body): the first batch the recipe recorded (SSL: every view of a sample in a row; CLIP: each
    image with its caption), else, for a classifier, the first views of epoch 0 rebuilt from the config."""
    out = page.out / "training_views.png"
    recorded = figures.recorded_views(run_dir)
    if recorded is not None:
        views, meta = recorded
        if meta.get("captions") is not None:
            p = figures.plot_captioned(views[0], meta["captions"], out)
        else:
            p = figures.plot_views(views, meta["names"], out)
        where = f" of stage '{meta['stage']}'" if meta.get("stage") else ""
        heading = f"Training views (the first batch{where}, as the model received it)"
        return heading, page.img(p, "report/training_views")
    x, y, dc, names = figures.training_views(run_dir, cache=cache)
    shown = figures.unnormalize(x, dc)
    p = figures.plot_grid(shown, [names[int(v)] if int(v) < len(names) else str(int(v)) for v in y], out)
    return "Training views (epoch 0, as the loader produced them)", page.img(p, "report/training_views")


def compare_runs(run_dirs: list[str | Path], out_dir: Optional[str | Path] = None) -> Path:
    """Overlay several runs' curves (one line per run, labelled by its directory name), stage by stage,
    with their results side by side. Written to ``out_dir`` (default: the first run's ``report/compare/``).
    Returns the page's path."""
    dirs = [Path(d) for d in run_dirs]
    labels = [d.name for d in dirs]
    if len(set(labels)) < len(labels):  # same names in different places: keep them apart
        labels = [f"{d.parent.name}/{d.name}" for d in dirs]
    out = Path(out_dir) if out_dir is not None else dirs[0] / REPORT_DIR / "compare"
    page = _Page(out, "visrep runs: " + ", ".join(labels))
    out.mkdir(parents=True, exist_ok=True)
    _curve_sections(page, dict(zip(labels, dirs)))
    res = {}
    for label, d in zip(labels, dirs):
        r = page.figure(f"results of {label}", lambda: json.loads((d / "results.json").read_text()))
        if r is not None:
            res[label] = r
    if res:
        keys = []
        for r in res.values():
            keys += [k for k in r if k not in keys]
        page.add("Results", _table([(k, *(r.get(k, "") for r in res.values())) for k in keys], ("figure", *res)))
    return page.write()


def log_images(trackers, images: dict[str, Path], step: Optional[int] = None) -> list[str]:
    """The report's PNGs to every tracker that takes images (TensorBoard, Weights & Biases): Accelerate's
    ``tracker.log_images``. Returns the names of the trackers that got them."""
    import numpy as np

    if not images:
        return []
    plt = curves._plt()
    arrays = {name: (plt.imread(str(p))[..., :3] * 255).astype(np.uint8) for name, p in images.items()}
    got = []
    for tracker in trackers:
        name = getattr(tracker, "name", "")
        if not hasattr(tracker, "log_images") or name == "jsonl":
            continue
        if name == "tensorboard":
            tracker.log_images({k: a[None] for k, a in arrays.items()}, step=step, dataformats="NHWC")
        else:  # wandb and the like: a list of images per key
            tracker.log_images({k: [a] for k, a in arrays.items()}, step=step)
        got.append(name)
    return got


def report_run(run) -> Optional[Path]:
    """The end of a recipe (``visrep.launch.finish_run``), main process only, with ``run.report``: build the
    report and send its images to the run's trackers. Any failure is a warning; the run goes on."""
    if not getattr(run.run_cfg, "report", True) or not run.is_main:
        return None
    t0 = time.perf_counter()
    try:
        page = build_report(run.run_dir)
    except Exception as e:  # noqa: BLE001 -- a report never fails a run
        warnings.warn(f"report: not written: {type(e).__name__}: {e}", ReportWarning, stacklevel=2)
        return None
    try:
        images = _page_images(page.parent)
        log_images(run.accelerator.trackers, images, step=run.global_step)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"report: images not sent to the trackers: {type(e).__name__}: {e}", ReportWarning, stacklevel=2)
    run.print(f"[visrep] report: {page} ({time.perf_counter() - t0:.1f} s)")
    return page


def _page_images(out: Path) -> dict[str, Path]:
    """The sample grid and the confusion matrices (what trackers get)."""
    found = {"report/training_views": out / "training_views.png"}
    found.update({f"report/{p.stem}": p for p in sorted(out.glob("confusion_*.png"))})
    return {k: p for k, p in found.items() if p.is_file()}
