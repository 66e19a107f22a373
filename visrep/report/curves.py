"""Curves from ``metrics.jsonl``: every numeric series a run logged, per stage, found from the keys."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from visrep.engine.run import read_metrics

# bookkeeping keys of every record (visrep.engine.run.Stage), not series
NOT_SERIES = {"step", "time", "stage_step", "epoch"}
NO_STAGE = "run"  # records logged outside a stage


def read_series(run_dir: str | Path) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """``{stage: {key: (x, y)}}`` from ``RUN_DIR/metrics.jsonl``: x is the stage's optimizer step
    (``stage_step``; the global ``step`` where a record has none), y every numeric value logged under
    ``key``. The final figures (``results/*``) are no curve: they are in the results table."""
    out: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for _, rec in read_metrics(Path(run_dir) / "metrics.jsonl"):
        stage = str(rec.get("stage") or NO_STAGE)
        x = rec.get("stage_step", rec.get("step"))
        if x is None:
            continue
        for key, value in rec.items():
            if key in NOT_SERIES or key == "stage" or key.startswith("results/"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            xs, ys = out.setdefault(stage, {}).setdefault(key, ([], []))
            xs.append(float(x))
            ys.append(float(value))
    return {s: keys for s, keys in out.items() if keys}


_ORDER = (re.compile(r"(^|/)loss$"), re.compile(r"^val[/_]"), re.compile(r"^lr$"), re.compile(r"^train/"))


def order_keys(keys) -> list[str]:
    """Training loss first, then the validation metrics, the learning rate, the other training parts
    (KD / CE terms, method schedules: tau, teacher temperature, GRL lambda, logit scale, ...), the rest."""
    def rank(k: str):
        for i, pattern in enumerate(_ORDER):
            if pattern.search(k):
                return (i, k)
        return (len(_ORDER), k)
    return sorted(keys, key=rank)


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def plot_stage(stage: str, runs: dict[str, dict[str, tuple[list, list]]], out_path: Path,
               keys: Optional[list[str]] = None) -> Path:
    """One figure for ``stage``: a subplot per series, a line per run (``runs``: label -> {key: (x, y)})."""
    plt = _plt()
    keys = keys or order_keys({k for series in runs.values() for k in series})
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, series in runs.items():
            if key in series:
                xs, ys = series[key]
                ax.plot(xs, ys, marker="o" if len(xs) <= 20 else None, markersize=3, label=label)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if key == "lr" or key.endswith("/lr"):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"stage: {stage}", fontsize=11)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
