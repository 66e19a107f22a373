"""visrep report: the page a run leaves behind (curves, results, config, confusion, Grad-CAM, training
views), the overlay of several runs, and that a report never fails a run."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from helpers import results, run_recipe, write_preset
from visrep.report import ReportWarning, build_report, curves, figures, log_images

PNG = b"\x89PNG\r\n\x1a\n"

# tests/test_distill_recipe.py's TINY at 1 epoch per stage
TINY = {
    "data": {"source": "digits", "image_size": 16, "hflip": 0.0, "label_fraction": 0.25},
    "teacher": {"source": "train", "model": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
                "train_epochs": 1, "optim": {"lr": 0.05}},
    "student": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
    "kd": {"temperature": 4.0, "kd_weight": 0.9, "allow_weaker_teacher": True},
    "optim": {"lr": 0.05},
    "schedule": {"epochs": 1, "warmup_epochs": 0.5},
    "run": {"batch_size": 32, "eval_batch_size": 128, "progress": False, "log_every": 1, "report": True},
}


@pytest.fixture(scope="module")
def distill_run(tiny, tmp_path_factory):
    """A tiny distillation run; its report is written by the recipe's end (run.report defaults on)."""
    d = tmp_path_factory.mktemp("report") / "kd_run"
    p = run_recipe("distill", ["--config", str(tiny), "--output-dir", str(d)])
    return d, p


def _images(html: str) -> set[str]:
    return set(re.findall(r'<img src="([^"]+)"', html))


def test_a_recipe_writes_its_report_with_every_figure(distill_run):
    d, p = distill_run
    out = d / "report"
    page = (out / "index.html").read_text()
    assert "[visrep] report:" in p.stdout, p.stdout[-2000:]
    print(re.search(r"\[visrep\] report: .*", p.stdout).group(0))  # its cost, for the record (pytest -s)
    expected = {f"curves_{s}.png" for s in ("teacher", "scratch", "kd")}
    expected |= {f"confusion_{s}.png" for s in ("teacher", "scratch", "kd")}
    expected.add("explain_kd.png")  # Grad-CAM of the run's final classifier
    expected.add("training_views.png")
    assert _images(page) == expected
    for name in expected:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
    # the results table and the resolved config, as HTML
    for key, value in results(d).items():
        assert f"<td>{key}</td>" in page
    assert "student_kd_acc" in page and "kd_weight: 0.9" in page and "Not shown" not in page


def test_curves_hold_every_numeric_series_of_each_stage(distill_run):
    d, _ = distill_run
    series = curves.read_series(d)
    assert set(series) >= {"teacher", "scratch", "kd"}
    # the KD stage's parts, its LR and its validation metrics are all discovered from the keys
    assert {"train/loss", "train/kd", "train/ce", "lr", "val_acc", "val_loss"} <= set(series["kd"])
    assert "results/student_kd_acc" not in {k for s in series.values() for k in s}
    recs = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    want = [(float(r["stage_step"]), r["val_acc"]) for r in recs if r.get("stage") == "kd" and "val_acc" in r]
    assert list(zip(*series["kd"]["val_acc"])) == want
    assert curves.order_keys(["lr", "train/kd", "val_acc", "train/loss", "zeta"]) == \
        ["train/loss", "val_acc", "lr", "train/kd", "zeta"]


def test_confusion_matrix_is_the_kd_students_test_predictions(distill_run):
    d, _ = distill_run
    stage, path, mcfg = figures.classifier_exports(d)[-1]
    assert stage == "kd"
    model = figures.load_classifier(path)
    data = figures.rebuild_data(d, stage, mcfg["data_config"])
    x, y, pred = figures.test_predictions(model, data)
    assert len(y) == min(len(data.test), figures.MAX_TEST_IMAGES)
    m = figures.confusion_matrix(y, pred, 10)
    assert int(m.sum()) == len(y)
    # the accuracy on the matrix's diagonal is the recipe's own test accuracy of the KD student
    assert float(m.diag().sum()) / len(y) == pytest.approx(results(d)["student_kd_acc"], abs=1e-6)


def test_confusion_and_most_confused_pairs_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 2, 2, 2, 0, 2])
    m = figures.confusion_matrix(labels, preds, 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 2], [1, 0, 2]]
    assert figures.most_confused(m, ["a", "b", "c"], top=2) == [("b", "c", 2), ("a", "b", 1)]
    assert figures.most_confused(torch.eye(3, dtype=torch.long), ["a", "b", "c"]) == []


def test_sample_grid_shows_what_the_training_step_received(tmp_path, tiny, fresh_accelerate_state):
    """The grid's tensor is the first 16 samples of the first batch the KD student was trained on."""
    from ds_helpers import load_recipe
    from visrep.data import build_classification_data
    from visrep.engine import Run
    from visrep.engine.config import from_dict
    from visrep.zoo import create_backbone, get_data_config

    recipe = load_recipe("distill")
    cfg = from_dict(recipe.DistillRecipeConfig, dict(yaml.safe_load(tiny.read_text()), output_dir=str(tmp_path / "r"),
                                                     seed=3))
    cfg.data.label_fraction = 0.1
    cfg.data.hflip = 0.5  # augmentation on: the grid must show the very same flips
    seen = []
    with Run(cfg, "distill", cfg.output_dir, cfg.seed, cfg.run) as run:
        student = create_backbone("resnet20", num_classes=10, small_input=True, width=0.25)
        student.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()) if m.training else None)
        data = build_classification_data(cfg.data, get_data_config(student), cfg.seed, cfg.run.batch_size, 64)
        recipe.train_classifier(run, cfg, data, "kd", student, cfg.student, cfg.optim, 1)
    x, y, dc, classes = figures.training_views(Path(cfg.output_dir))
    assert x.shape == (16, 3, 16, 16) and len(classes) == 10
    assert torch.equal(x, seen[0][:16])
    shown = figures.unnormalize(x, dc)
    assert shown.shape == (16, 16, 16, 3) and 0 <= shown.min() and shown.max() <= 1


def _fake_run(d: Path, loss: list[float], acc: float) -> Path:
    d.mkdir(parents=True)
    recs = [{"step": i + 1, "stage": "main", "stage_step": i + 1, "epoch": 0, "train/loss": v,
             "train/tau": 0.99 + 0.001 * i, "lr": 0.1} for i, v in enumerate(loss)]
    recs.append({"step": len(loss), "stage": "main", "stage_step": len(loss), "epoch": 1, "val_acc": acc})
    recs.append({"step": len(loss), "results/acc": acc})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"cut sh')
    (d / "results.json").write_text(json.dumps({"acc": acc}))
    return d


def test_overlay_of_two_runs_from_the_command_line(tmp_path, monkeypatch):
    from visrep.cli import main

    a = _fake_run(tmp_path / "scratch", [2.0, 1.5, 1.0], 0.5)
    b = _fake_run(tmp_path / "kd", [1.8, 1.2, 0.7], 0.75)
    lines = {}
    real = curves.plot_stage

    def spy(stage, runs, out_path, keys=None):
        lines[stage] = runs
        return real(stage, runs, out_path, keys)

    monkeypatch.setattr(curves, "plot_stage", spy)
    out = tmp_path / "cmp"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReportWarning)
        assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert _images(page) == {"curves_main.png"} and (out / "curves_main.png").read_bytes().startswith(PNG)
    assert list(lines["main"]) == ["scratch", "kd"]  # one line per run, labelled by its directory
    assert lines["main"]["kd"]["train/loss"] == ([1.0, 2.0, 3.0], [1.8, 1.2, 0.7])
    assert lines["main"]["scratch"]["train/tau"][1] == pytest.approx([0.99, 0.991, 0.992])
    assert "<th>scratch</th><th>kd</th>" in page and "<td>0.7500</td>" in page


def test_a_plotting_error_is_a_warning_and_the_page_is_still_written(tmp_path, monkeypatch):
    d = _fake_run(tmp_path / "run", [1.0, 0.5], 0.9)

    def broken(*a, **k):
        raise RuntimeError("no display")

    monkeypatch.setattr(curves, "plot_stage", broken)
    with pytest.warns(ReportWarning, match="curves of stage 'main' skipped: RuntimeError: no display"):
        page = build_report(d)
    text = page.read_text()
    assert "<td>acc</td>" in text and "no display" in text  # the results table, and why the curves are missing


def test_a_failing_report_never_fails_the_recipe(tmp_path, tiny, monkeypatch):
    import visrep.report.page as report_page

    def broken(run_dir):
        raise RuntimeError("plotting exploded")

    monkeypatch.setattr(report_page, "build_report", broken)
    preset = yaml.safe_load(tiny.read_text())
    preset["data"]["label_fraction"] = 0.1
    d = tmp_path / "run"
    with pytest.warns(ReportWarning, match="report: not written: RuntimeError: plotting exploded"):
        p = run_recipe("distill", ["--config", str(write_preset(tmp_path / "p.yaml", preset)), "--output-dir", str(d)])
    assert p.returncode == 0 and (d / "results.json").is_file() and not (d / "report").exists()


def test_report_images_reach_tensorboard(distill_run, tmp_path):
    from accelerate.tracking import TensorBoardTracker
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d, _ = distill_run
    images = {"report/training_views": d / "report" / "training_views.png",
              "report/confusion_kd": d / "report" / "confusion_kd.png"}
    tb = TensorBoardTracker("report", str(tmp_path / "tb"))
    if hasattr(tb, "start"):
        tb.start()
    assert log_images([tb], images, step=7) == ["tensorboard"]
    tb.finish()
    acc = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.*")).parent)).Reload()
    assert set(acc.Tags()["images"]) == set(images)
    ev = acc.Images("report/confusion_kd")[0]
    assert ev.step == 7 and ev.encoded_image_string.startswith(PNG)


@pytest.mark.slow
def test_weights_and_biases_offline_gets_the_metrics_and_the_report_images(tmp_path, tiny):
    """`--run.trackers jsonl wandb` with WANDB_MODE=offline: the run's offline W&B record holds the logged
    metrics and the final figures, and the report's images (training views, confusion matrices) are media
    of the W&B run."""
    pytest.importorskip("wandb")  # the dev extra installs it
    d = tmp_path / "run"
    run_recipe("distill", ["--config", str(tiny), "--output-dir", str(d), "--run.trackers", "jsonl", "wandb"],
               extra_env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"train/loss", b"val_acc", b"student_kd_acc"):
        assert key in record, key
    media = {p.name.split("_")[0] for p in (runs[0] / "files" / "media" / "images" / "report").glob("*.png")}
    assert {"training", "confusion"} <= media, media
