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


# ---------------------------------------------------------------------------------------- recorded views
# tests/test_ssl_recipe.py's and tests/test_clip_recipe.py's tiny settings, at 1 epoch and fewer images
SSL_TINY = {
    "method": "dino",
    "data": {"source": "digits", "image_size": 16, "hflip": 0.0, "label_fraction": 0.1},
    "model": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
    "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "warmup_teacher_temp_epochs": 1.0,
             "n_local": 2, "local_size": 8, "local_crop_scale": [0.1, 0.4]},
    "augment": {"crop_scale": [0.3, 1.0], "hflip": 0.5, "device": "accelerator"},
    "optim": {"name": "sgd", "lr": 0.1, "weight_decay": 1e-5},
    "schedule": {"epochs": 1, "warmup_epochs": 0.5},
    "eval": {"knn_k": 5, "linear_epochs": 1, "every_epochs": 0},
    "run": {"batch_size": 32, "eval_batch_size": 128, "progress": False, "log_every": 1, "report": True},
}
CLIP_TINY = {
    "data": {"source": "digits", "image_size": 8, "hflip": 0.0, "val_fraction": 0.4, "test_fraction": 0.4},
    "model": {"image": {"source": "zoo", "name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
              "text": {"source": "small", "context_length": 12, "width": 32, "layers": 1, "heads": 2},
              "embed_dim": 16},
    "schedule": {"epochs": 1, "warmup_epochs": 0.5},
    "run": {"batch_size": 32, "eval_batch_size": 128, "progress": False, "log_every": 1, "report": True},
}


def _first_call(monkeypatch, cls) -> list:
    """Patch ``cls.forward`` to keep (a CPU copy of) the arguments of its first call in training mode."""
    seen, real = [], cls.forward

    def forward(self, *args, **kwargs):
        if self.training and not seen:
            seen.append([a.detach().cpu().clone() for a in args])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", forward)
    return seen


def test_ssl_report_shows_every_view_of_the_first_batch_and_a_resume_keeps_it(tmp_path, monkeypatch):
    """DINO with device-side multi-crop (2 global + 2 local crops): the saved views are, pixel for pixel, the
    tensors the model's first training forward received; the run stopped after one step and resumed keeps
    them (its first batch is not the run's), and its report draws them."""
    from visrep.engine.run import read_samples
    from visrep.ssl.methods import DINO

    seen = _first_call(monkeypatch, DINO)
    preset = str(write_preset(tmp_path / "ssl.yaml", SSL_TINY))
    d = tmp_path / "run"
    run_recipe("selfsup", ["--config", preset, "--output-dir", str(d), "--run.stop-after-steps", "1"])
    views, meta = read_samples(d)
    assert [v.shape for v in views] == [(16, 3, 16, 16)] * 2 + [(16, 3, 8, 8)] * 2
    assert meta["names"] == ["view 1", "view 2", "local 1", "local 2"] and meta["captions"] is None
    assert meta["stage"] == "dino" and len(seen[0]) == 4
    for v, x in zip(views, seen[0]):
        assert torch.equal(v, x[:16])
    saved = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (d / "samples").iterdir()}
    assert set(saved) == {"train_views.pt", "train_views.json"}

    run_recipe("selfsup", ["--config", preset, "--output-dir", str(d), "--resume", "latest"])
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (d / "samples").iterdir()} == saved
    page = (d / "report" / "index.html").read_text()
    assert "training_views.png" in _images(page) and "the first batch of stage &#x27;dino&#x27;" in page
    png = (d / "report" / "training_views.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 1000 and "Not shown" not in page


def test_clip_report_shows_each_image_with_its_caption(tmp_path, monkeypatch):
    """The saved images are the first training forward's, pixel for pixel, and the saved captions are the
    texts of its tokens (tokenizing them again gives the very tokens)."""
    from visrep.clip.model import ClipModel, Tokenizer
    from visrep.data.pairs import DIGIT_NAMES
    from visrep.engine.run import read_samples

    seen = _first_call(monkeypatch, ClipModel)
    d = tmp_path / "run"
    run_recipe("clip", ["--config", str(write_preset(tmp_path / "clip.yaml", CLIP_TINY)), "--output-dir", str(d)])
    (images,), meta = read_samples(d)
    x, tokens = seen[0]
    assert images.shape == (16, 3, 8, 8) and torch.equal(images, x[:16])
    captions = meta["captions"]
    assert len(captions) == 16 and torch.equal(Tokenizer(context_length=12)(captions), tokens[:16])
    assert all(any(str(n).lower() in c.lower() for names in DIGIT_NAMES for n in names) for c in captions), captions
    page = (d / "report" / "index.html").read_text()
    assert "training_views.png" in _images(page) and "as the model received it" in page
    shown, _ = figures.recorded_views(d)
    assert shown[0].shape == (16, 8, 8, 3) and 0 <= shown[0].min() and shown[0].max() <= 1


def test_a_failure_to_save_the_samples_is_a_warning_once(tmp_path, monkeypatch, fresh_accelerate_state):
    import visrep.engine.run as engine_run
    from visrep.engine import Run
    from visrep.engine.config import RecipeConfig, RunConfig

    def full(tmp, final):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine_run, "replace_dir", full)
    d = tmp_path / "run"
    views = [torch.rand(20, 1, 8, 8), torch.rand(20, 1, 8, 8), torch.rand(20, 1, 4, 4)]
    with Run(RecipeConfig(output_dir=str(d), run=RunConfig(progress=False, report=False)), "test") as run:
        model = torch.nn.Linear(2, 2)
        stage = run.stage("s", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          train_loader=[0, 1], epochs=1)
        with pytest.warns(engine_run.SamplesWarning, match="not saved for the report .*No space left on device"):
            stage.record_samples(views, {"mean": [0.5], "std": [0.25]})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            stage.record_samples(views, {"mean": [0.5], "std": [0.25]})  # once a run, not at every batch
    assert not (d / "samples").exists() and not list(d.glob(".samples-*"))  # nothing half written is left
    assert engine_run.view_names(views) == ["view 1", "view 2", "local 1"]
    same_size = [views[0], views[1], views[0]]  # local crops as large as the global views: told by position
    assert engine_run.view_names(same_size, global_views=2) == ["view 1", "view 2", "local 1"]
    assert engine_run.view_names(same_size) == ["view 1", "view 2", "view 3"]
