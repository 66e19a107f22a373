"""Dense transfer: the segmentation metrics against hand-computed confusion matrices (one process and two),
the Digits-M stroke masks, the segmentation model over a CNN and a transformer with FPN and U-Net, and
recipes/segment.py end to end: exact resume, a start from an SSL export, clear config errors."""
import json
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import ACCELERATE_LAUNCH, ROOT, env, free_port, run_in_process, run_recipe, straight_and_stopped
from visrep.data.segmentation import (IGNORE_INDEX, SegmentationDataConfig, segmentation_arrays,
                                      stroke_masks)
from visrep.transfer.dense import (DenseHeadConfig, SegmentationModel, confusion_matrix, iou_per_class, mean_iou,
                                   pixel_accuracy, segmentation_loss)

TINY = {
    "init": {"source": "scratch", "model": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}}},
    "data": {"image_size": 8, "label_fraction": 0.1, "augment": "light"},
    "head": {"neck": "fpn", "channels": 8},
    "optim": {"name": "sgd", "lr": 0.05, "weight_decay": 0.0005, "momentum": 0.9},
    "schedule": {"epochs": 2, "warmup_epochs": 0.5},
    "run": {"batch_size": 16, "eval_batch_size": 128, "progress": False, "log_every": 1},
}


# ------------------------------------------------------------------ metrics
def test_confusion_miou_and_pixel_accuracy_equal_hand_computed_values():
    # 8 pixels, 4 classes; the ignored pixel is predicted 3, so class 3 is absent from both target and
    # prediction and stays out of the mean
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, IGNORE_INDEX, 0]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 3, 0]]])
    cm = confusion_matrix(pred, target, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]  # rows: target
    iou = iou_per_class(cm)
    assert iou[:3].tolist() == [2 / 4, 2 / 3, 1 / 2] and torch.isnan(iou[3])
    assert mean_iou(cm) == pytest.approx((2 / 4 + 2 / 3 + 1 / 2) / 3, abs=1e-15)
    assert pixel_accuracy(cm) == pytest.approx(5 / 7, abs=1e-15)
    per = confusion_matrix(pred.repeat(3, 1, 1), target.repeat(3, 1, 1), 4, per_sample=True)
    assert per.shape == (3, 4, 4) and torch.equal(per.sum(0), 3 * cm)
    with pytest.raises(ValueError, match="target classes"):
        confusion_matrix(pred, torch.full_like(target, 4), 4)


def naive_metrics(pred: np.ndarray, target: np.ndarray, k: int) -> tuple[float, float]:
    """mIoU and pixel accuracy straight from their definitions, over all pixels of a split (float64)."""
    keep = target != IGNORE_INDEX
    p, t = pred[keep], target[keep]
    ious = []
    for c in range(k):
        inter, union = np.sum((p == c) & (t == c)), np.sum((p == c) | (t == c))
        if union:
            ious.append(inter / union)
    return float(np.mean(ious)), float(np.mean(p == t))


def logits_problem():
    """A split of 23 images of 3x5 pixels (4 classes, some ignored pixels) and a model's logits for it: the
    images ARE the logits (the model is the identity)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(23, 4, 3, 5, generator=g)
    target = torch.randint(0, 4, (23, 3, 5), generator=g)
    target[torch.rand(23, 3, 5, generator=g) < 0.1] = IGNORE_INDEX
    target[:12][target[:12] == 3] = 0  # class 3 only in the second half, the first half mostly right:
    logits[:12] += 3 * torch.nn.functional.one_hot(target[:12].clamp(max=3), 4).permute(0, 3, 1, 2)
    return logits, target  # per-batch means would differ


def test_split_metrics_sum_the_confusion_before_dividing(fresh_accelerate_state):
    from accelerate import Accelerator

    from visrep.transfer.dense import evaluate_segmentation

    logits, target = logits_problem()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(logits, target), batch_size=4)
    r = evaluate_segmentation(torch.nn.Identity(), loader, Accelerator(cpu=True), 4)
    miou, acc = naive_metrics(logits.argmax(1).numpy(), target.numpy(), 4)
    assert r["miou"] == pytest.approx(miou, abs=1e-12) and r["pixel_acc"] == pytest.approx(acc, abs=1e-12)
    per_batch = np.mean([naive_metrics(logits[i:i + 4].argmax(1).numpy(), target[i:i + 4].numpy(), 4)[0]
                         for i in range(0, 23, 4)])
    assert abs(per_batch - miou) > 1e-3  # what the sum-then-divide rule guards against
    keep = target != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(logits.double(), target, ignore_index=IGNORE_INDEX)
    assert r["loss"] == pytest.approx(nll.item(), rel=1e-6) and r["pixels"] == int(keep.sum())
    assert segmentation_loss(logits, target).item() == pytest.approx(nll.item(), rel=1e-5)


SCRIPT = r'''
import json, sys, torch
from accelerate import Accelerator
from helpers import exit_cleanly
from test_segment import logits_problem
from visrep.transfer.dense import evaluate_segmentation

acc = Accelerator(cpu=True)
logits, target = logits_problem()
loader = acc.prepare(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(logits, target), batch_size=4))
r = evaluate_segmentation(torch.nn.Identity(), loader, acc, 4)
with open(sys.argv[1] + f"/rank{acc.process_index}.json", "w") as fh:
    json.dump({"world": acc.num_processes, **r}, fh)
exit_cleanly(acc)
'''


@pytest.mark.slow
def test_confusion_matrix_across_two_processes_equals_one(tmp_path):
    """23 images in batches of 4 over 2 ranks: Accelerate repeats samples to even out the last batch;
    the gathered confusion matrix counts every pixel once, as one process does."""
    script = tmp_path / "dist_seg.py"
    script.write_text(SCRIPT)
    cmd = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(script), str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    logits, target = logits_problem()
    cm = confusion_matrix(logits.argmax(1), target, 4)
    for r in (0, 1):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["world"] == 2 and res["confusion"] == cm.tolist()
        assert res["miou"] == mean_iou(cm) and res["pixel_acc"] == pixel_accuracy(cm)


# ------------------------------------------------------------------ data
def test_stroke_masks_label_the_strokes_with_their_digit():
    strokes = np.array([[[0, 60, 130], [255, 127, 64]]], dtype=np.uint8)  # grey levels 0, .24, .51, 1, .498, .25
    m = stroke_masks(strokes, np.array([7]), stroke_threshold=0.5, ignore_below=0.25)
    assert m.tolist() == [[[0, 0, 8], [8, IGNORE_INDEX, IGNORE_INDEX]]]
    assert stroke_masks(strokes, np.array([2]), 0.5, 0.5).tolist() == [[[0, 0, 3], [3, 0, 0]]]  # no band


def test_digits_m_masks_follow_the_digit_and_share_its_splits():
    from visrep.data.digits_m import digits_m_arrays, split_indices
    from visrep.data.sources import digits_arrays

    cfg = SegmentationDataConfig(image_size=8)
    images, masks, labels, splits = segmentation_arrays(cfg)
    dimages, dlabels, dsplits = digits_m_arrays(cfg.digits_config())
    assert np.array_equal(images, dimages) and np.array_equal(labels, dlabels)
    for s in ("train", "val", "test"):
        assert np.array_equal(splits[s], dsplits[s])
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["val"]) & set(splits["test"])
    stroke = digits_arrays(8, 3)[0][..., 0] / 255.0
    fg = stroke >= 0.5
    assert np.array_equal(masks[fg], (1 + np.broadcast_to(labels[:, None, None], masks.shape))[fg])
    assert (masks[stroke < 0.25] == 0).all() and (masks[(stroke >= 0.25) & ~fg] == IGNORE_INDEX).all()
    assert all(fg[i].any() for i in range(len(labels)))  # every image has stroke pixels
    _, _, _, budget = segmentation_arrays(SegmentationDataConfig(image_size=8, label_fraction=0.1))
    assert set(budget["train"]) < set(splits["train"]) and np.array_equal(budget["val"], splits["val"])
    assert np.array_equal(split_indices(labels, cfg.digits_config())["test"], splits["test"])


# ------------------------------------------------------------------ model
@pytest.mark.parametrize("name,kwargs,out_indices", [
    ("resnet20", {"width": 0.25}, None),
    ("vit_tiny_patch16_224", {"depth": 2, "embed_dim": 16, "num_heads": 2, "img_size": 16}, [0, 1]),
])
@pytest.mark.parametrize("neck", ["fpn", "unet"])
def test_segmentation_model_gives_per_pixel_logits_at_input_size(name, kwargs, out_indices, neck, tmp_path):
    from accelerate import Accelerator

    from visrep.engine import BackboneConfig
    from visrep.engine.export import load_exported
    from visrep.transfer.dense import export_segmentation
    from visrep.zoo import create_backbone

    torch.manual_seed(0)
    head = DenseHeadConfig(neck=neck, channels=8, decoder_channels=[8, 8, 8], out_indices=out_indices)
    model = SegmentationModel(create_backbone(name, num_classes=0, small_input=True, **kwargs), 11, head)
    x = torch.randn(2, 3, 16, 16)
    y = model(x)
    assert y.shape == (2, 11, 16, 16)
    segmentation_loss(y, torch.randint(0, 11, (2, 16, 16))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())  # all used (DDP)
    # the export reloads by its kind, the same function
    bb = BackboneConfig(name=name, small_input=True, kwargs=kwargs)
    export_segmentation(Accelerator(cpu=True), model, tmp_path, bb, 11, model.data_config, head)
    loaded, cfg = load_exported(tmp_path)
    assert cfg["kind"] == "segmentation" and cfg["head"]["neck"] == neck
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------ the recipe
@pytest.mark.slow
def test_recipe_resumes_exactly_and_reports_test_figures(tiny, tmp_path):
    # 126 training images -> 7 batches of 16 per epoch: stop inside epoch 2, then resume
    a, b = straight_and_stopped("segment", ["--config", str(tiny)], tmp_path, 10)
    run_recipe("segment", ["--config", str(tiny), "--output-dir", str(b), "--resume", "latest"])
    wa, wb = (load_file(str(d / "models" / "segment" / "model.safetensors")) for d in (a, b))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for k in ("miou", "pixel_acc", "val_miou", "selected_epoch"):
        assert ra[k] == rb[k], k
    assert 0 < ra["miou"] <= 1 and 0 < ra["pixel_acc"] <= 1 and ra["num_classes"] == 11
    assert ra["train_images"] == 126 and ra["init"] == "scratch"
    recs = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_miou"] for r in recs if "val_miou" in r]
    assert len(val) == 2 and ra["val_miou"] == pytest.approx(max(val)) and ra["selected_epoch"] == 1 + val.index(max(val))
    assert "train/loss" in recs[0] and any("results/miou" in r for r in recs)
    # rb: the metrics file reads as one run
    assert [r["val_miou"] for r in map(json.loads, (b / "metrics.jsonl").read_text().splitlines()) if "val_miou" in r] == val


@pytest.mark.slow
def test_recipe_starts_from_an_ssl_export_with_a_unet(tiny, tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator

    from visrep.engine import BackboneConfig
    from visrep.ssl.export import export_backbone
    from visrep.zoo import create_backbone, get_data_config

    torch.manual_seed(3)
    bb = BackboneConfig(name="resnet20", small_input=True, kwargs={"width": 0.25})
    ssl = torch.nn.Module()  # what an SSL method holds: the encoder under 'backbone.' and a projector
    ssl.backbone = create_backbone("resnet20", num_classes=0, small_input=True, width=0.25)
    ssl.projector = torch.nn.Linear(ssl.backbone.num_features, 4)
    export_backbone(Accelerator(cpu=True), ssl, tmp_path / "ssl", bb, get_data_config(ssl.backbone))
    out = tmp_path / "seg"
    run_recipe("segment", ["--config", str(tiny), "--output-dir", str(out), "--init.source", "export",
                           "--init.path", str(tmp_path / "ssl"), "--head.neck", "unet", "--optim.lr", "1e-9",
                           "--optim.weight-decay", "0", "--schedule.epochs", "1"])
    r = json.loads((out / "results.json").read_text())
    assert r["init"] == str(tmp_path / "ssl") and r["neck"] == "unet"
    seg = load_file(str(out / "models" / "segment" / "model.safetensors"))
    enc = {k[len("neck.encoder.model."):]: v for k, v in seg.items() if k.startswith("neck.encoder.model.")}
    weights = {k: v for k, v in ssl.backbone.state_dict().items() if k.endswith("weight") and v.ndim == 4}
    assert weights and all(k in enc for k in weights)
    for k, v in weights.items():  # lr 1e-9: the encoder still holds the SSL weights
        torch.testing.assert_close(enc[k], v, rtol=0, atol=1e-6)


def test_clear_config_errors(capsys, tmp_path):
    p = run_in_process("segment", ["--init.source", "train", "--output-dir", str(tmp_path / "a")], capsys)
    assert p.returncode != 0 and "init.source" in p.stderr and "--init.source export" in p.stderr
    p = run_in_process("segment", ["--init.source", "export", "--output-dir", str(tmp_path / "b")], capsys)
    assert p.returncode != 0 and "init.path" in p.stderr
    p = run_in_process("segment", ["--data.ignore-below", "0.7", "--output-dir", str(tmp_path / "c")], capsys)
    assert p.returncode != 0 and "data.ignore_below" in p.stderr
    p = run_in_process("segment", ["--head.out-indices", "0", "7", "--output-dir", str(tmp_path / "d")], capsys)
    assert p.returncode != 0 and "head.out_indices" in p.stderr and "4 feature levels" in p.stderr
    p = run_in_process("segment", ["--head.neck", "deeplab", "--output-dir", str(tmp_path / "e")], capsys)
    assert p.returncode != 0 and "deeplab" in p.stderr
