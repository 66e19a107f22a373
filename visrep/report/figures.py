"""What a report rebuilds from a run directory: the recipe's data (from the saved config) and its
classifier exports -- the test confusion matrix, Grad-CAM / attention maps, and the first training views
(recorded by the recipe, ``visrep.engine.run.save_samples``, or rebuilt from the config)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Optional

import torch
import yaml

from visrep.data import DataConfig, build_classification_data, load_digits_m_splits
from visrep.data.sources import load_splits
from visrep.engine.config import from_dict
from visrep.engine.export import export_kind, load_exported, read_model_config
from visrep.engine.run import read_samples
from visrep.errors import UserError

MAX_TEST_IMAGES = 270  # the embedded digits' test split: a report costs seconds, whatever the data
MAX_CAM_IMAGES = 8
MAX_GRID = 16


class NotAvailable(UserError):
    """A figure the run holds nothing for (no export, no data section, a streamed source, ...)."""


def run_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise NotAvailable(f"'{path}' is missing")
    return yaml.safe_load(path.read_text()) or {}


def recipe_name(run_dir: Path) -> str:
    state = run_dir / "state.json"
    return str(json.loads(state.read_text()).get("recipe", "")) if state.is_file() else ""


def classifier_exports(run_dir: Path) -> list[tuple[str, Path, dict]]:
    """(stage, directory, config) of every export of kind backbone with a classifier head, in the
    order the stages ran (state.json), else by name."""
    models = run_dir / "models"
    if not models.is_dir():
        return []
    state = run_dir / "state.json"
    order = list(json.loads(state.read_text()).get("stages", {})) if state.is_file() else []
    dirs = sorted((d for d in models.iterdir() if (d / "config.json").is_file()),
                  key=lambda d: (order.index(d.name) if d.name in order else len(order), d.name))
    out = []
    for d in dirs:
        cfg = read_model_config(d)
        if export_kind(cfg) == "backbone" and int(cfg.get("num_classes") or 0) > 0:
            out.append((d.name, d, cfg))
    return out


def data_section(cfg: dict, stage: str) -> tuple[DataConfig, bool]:
    """The stage's data config (finetune's ``source`` stage trains on ``source_data``) and whether its
    splits are Digits-M (``target_domain: digits_m``)."""
    key = "source_data" if stage == "source" and "source_data" in cfg else "data"
    if not isinstance(cfg.get(key), dict):
        raise NotAvailable(f"the run's config has no '{key}' section of a classification dataset")
    data = from_dict(DataConfig, cfg[key], prefix=f"{key}.")
    if data.streamed:
        raise NotAvailable(f"{key}.source '{data.source}' is streamed; the report rebuilds in-memory splits only")
    return data, key == "data" and cfg.get("target_domain") == "digits_m"


def rebuild_data(run_dir: Path, stage: str, data_config: dict, cache: Optional[dict] = None):
    """The recipe's ``ClassificationData`` for ``stage``, as the recipe built it (same config, seed,
    batch size; no loader workers). ``cache``: a dict that keeps it for the next stage with the same data."""
    cfg = run_config(run_dir)
    data, digits_m = data_section(cfg, stage)
    key = (repr(data), digits_m, json.dumps(data_config, sort_keys=True))
    if cache is not None and key in cache:
        return cache[key]
    splits = load_digits_m_splits(data) if digits_m else load_splits(data)
    run = cfg.get("run") or {}
    built = build_classification_data(data, data_config, int(cfg.get("seed", 0)), int(run.get("batch_size", 32)),
                                      int(run.get("eval_batch_size", 256)), 0, splits=splits)
    if cache is not None:
        cache[key] = built
    return built


def unnormalize(x: torch.Tensor, data_config: dict) -> torch.Tensor:
    """(N, C, H, W) normalised batch -> (N, H, W, 3) in [0, 1] for display."""
    c = x.shape[1]
    mean = torch.tensor(data_config["mean"], dtype=x.dtype)[:c].view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"], dtype=x.dtype)[:c].view(1, -1, 1, 1)
    img = (x * std + mean).clamp(0, 1)
    if c == 1:
        img = img.expand(-1, 3, -1, -1)
    return img.permute(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------- test split
@torch.no_grad()
def test_predictions(model: torch.nn.Module, data, limit: int = MAX_TEST_IMAGES):
    """(images, labels, predictions) of the first ``limit`` test images, in the split's order."""
    model.eval()
    xs, ys, ps, seen = [], [], [], 0
    for x, y in data.test_loader:
        x, y = x[:limit - seen], y[:limit - seen]
        xs.append(x)
        ys.append(y)
        ps.append(model(x).argmax(-1))
        seen += len(y)
        if seen >= limit:
            break
    return torch.cat(xs), torch.cat(ys), torch.cat(ps)


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``m[t, p]``: how many test images of class t were predicted as p."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def most_confused(m: torch.Tensor, classes: list[str], top: int = 5) -> list[tuple[str, str, int]]:
    """The ``top`` off-diagonal cells (true, predicted, count), largest first; none when all are right."""
    off = m.clone()
    off.fill_diagonal_(0)
    flat = off.flatten()
    order = torch.argsort(flat, descending=True, stable=True)[:top]
    n = m.shape[0]
    return [(classes[int(i) // n], classes[int(i) % n], int(flat[i])) for i in order if flat[i] > 0]


def load_classifier(path: Path) -> torch.nn.Module:
    model, _ = load_exported(path, kind="backbone")
    return model.eval()


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: Path, tight: bool = True) -> Path:
    """``tight``: fit the layout to the labels (a fifth of a report's time); image grids set theirs."""
    plt = _plt()
    out.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_confusion(m: torch.Tensor, classes: list[str], title: str, out: Path) -> Path:
    plt = _plt()
    n = m.shape[0]
    size = min(9.0, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    ax.imshow(m.numpy(), cmap="Blues")
    if n <= 30:
        ax.set_xticks(range(n), [str(c) for c in classes], rotation=90, fontsize=7)
        ax.set_yticks(range(n), [str(c) for c in classes], fontsize=7)
        if n <= 15:
            for t in range(n):
                for p in range(n):
                    if m[t, p]:
                        ax.text(p, t, int(m[t, p]), ha="center", va="center", fontsize=7,
                                color="white" if m[t, p] > m.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = float(m.diag().sum()) / max(1, int(m.sum()))
    ax.set_title(f"{title}: test accuracy {acc:.4f} ({int(m.sum())} images)", fontsize=10)
    return _save(fig, out)


def plot_explanations(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, classes: list[str],
                      data_config: dict, out: Path) -> tuple[Path, str]:
    """Grad-CAM of the predicted class for a CNN (``visrep.zoo.viz.grad_cam``); for a ViT / Swin, the
    attention of the first image (``visrep.zoo.viz.save_attention``). Returns (path, what it shows)."""
    from visrep.zoo import viz

    try:
        layer = viz.default_cam_layer(model)
    except Exception:
        layer = None
    display = unnormalize(x, data_config)
    if layer is None or viz.is_swin(model) or hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        return viz.save_attention(model, x[:1], display[0], out), "attention"
    cam, target = viz.grad_cam(model, x, layer=layer)
    plt = _plt()
    n = len(x)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.6), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(display[i].numpy())
        axes[0, i].set_title(f"true {classes[int(labels[i])]}", fontsize=8)
        axes[1, i].imshow(display[i].numpy())
        axes[1, i].imshow(cam[i].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        axes[1, i].set_title(f"pred {classes[int(target[i])]}", fontsize=8)
        for a in axes[:, i]:
            a.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93, wspace=0.05, hspace=0.15)
    return _save(fig, out, tight=False), f"Grad-CAM ({layer})"


# ---------------------------------------------------------------------------------------- training views
def training_views(run_dir: Path, n: int = MAX_GRID,
                   cache: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor, dict, list[str]]:
    """The first ``n`` training samples of epoch 0 exactly as the recipe's loader produced them
    (normalised), their labels, the data config they were normalised with and the class names: the training set
    rebuilt from the saved config with the run's seed and batch size (order and augmentation are a
    function of (seed, epoch, index): ``visrep.data.EpochSampler``). The data config is the last
    classifier export's (the model the loader was built for)."""
    exports = classifier_exports(run_dir)
    if not exports:
        raise NotAvailable("no classifier export (models/*/ of kind backbone with num_classes > 0) to take the "
                           "data config from")
    stage, _, mcfg = exports[-1]
    dc = mcfg.get("data_config")
    if not dc:
        raise NotAvailable(f"models/{stage}/config.json has no data_config")
    data = rebuild_data(run_dir, stage, dc, cache)
    for s in data.epoch_setters:
        s.set_epoch(0)
    xs, ys, seen = [], [], 0
    for x, y in data.train_loader:
        xs.append(x[:n - seen])
        ys.append(y[:n - seen])
        seen += len(xs[-1])
        if seen >= n:
            break
    return torch.cat(xs), torch.cat(ys), dc, [str(c) for c in data.classes]


def plot_grid(images: torch.Tensor, titles: list[str], out: Path, cols: int = 8) -> Path:
    """``images``: (N, H, W, 3) in [0, 1]."""
    plt = _plt()
    n = len(images)
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.55 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i].numpy(), interpolation="nearest")
            ax.set_title(titles[i], fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93, wspace=0.05, hspace=0.2)
    return _save(fig, out, tight=False)


# ---------------------------------------------------------------------------------------- recorded views
def recorded_views(run_dir: Path) -> Optional[tuple[list[torch.Tensor], dict]]:
    """The first training batch as the recipe's model received it (``RUN_DIR/samples/``, written by
    ``Stage.record_samples``): every view for display, (N, H, W, 3) in [0, 1], and the record's meta
    (names, captions, mean, std, stage); None when the run recorded none."""
    got = read_samples(run_dir)
    if got is None:
        return None
    views, meta = got
    dc = {"mean": meta["mean"], "std": meta["std"]}
    return [unnormalize(v.float(), dc) for v in views], meta


def plot_views(views: list[torch.Tensor], names: list[str], out: Path) -> Path:
    """One row per sample, one column per view (``views``: each (N, H, W, 3) in [0, 1]); a column is as
    wide as its view, so multi-crop's local crops are drawn at their own, smaller size."""
    plt = _plt()
    n, widths = len(views[0]), [v.shape[2] for v in views]
    scale = 1.3 / max(widths)
    fig, axes = plt.subplots(n, len(views), figsize=(sum(widths) * scale + 0.1 * len(views), 1.4 * n + 0.3),
                             squeeze=False, gridspec_kw={"width_ratios": widths})
    for j, (v, name) in enumerate(zip(views, names)):
        axes[0, j].set_title(name, fontsize=8)
        for i in range(n):
            axes[i, j].imshow(v[i].numpy(), interpolation="nearest")
            axes[i, j].axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / (1.4 * n + 0.3), wspace=0.08, hspace=0.08)
    return _save(fig, out, tight=False)


def plot_captioned(images: torch.Tensor, captions: list[str], out: Path, cols: int = 8, width: int = 22) -> Path:
    """Each image (``images``: (N, H, W, 3) in [0, 1]) with its caption, wrapped, under it."""
    plt = _plt()
    n = len(images)
    cols = min(cols, n)
    rows = -(-n // cols)
    wrapped = [textwrap.fill(str(c), width) for c in captions]
    text_h = 0.12 + 0.13 * max(w.count("\n") + 1 for w in wrapped)  # inches under each image
    height = rows * (1.45 + text_h)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, height), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i].numpy(), interpolation="nearest")
            ax.text(0.5, -0.03, wrapped[i], transform=ax.transAxes, ha="center", va="top", fontsize=6.5)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=text_h / height, top=1 - 0.05 / height, wspace=0.1,
                        hspace=text_h / 1.45)
    return _save(fig, out, tight=False)
