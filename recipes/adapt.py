"""Unsupervised domain adaptation: labelled source, unlabelled target, one classifier for both.

    accelerate launch recipes/adapt.py --method dann            # Digits -> Digits-M, CPU-sized
    accelerate launch recipes/adapt.py --method source_only     # the baseline every method must beat
    accelerate launch recipes/adapt.py --method mmd --adapt.mmd-weight 1.0
    accelerate launch recipes/adapt.py --method coral --resume latest --output-dir runs/adapt
    accelerate launch recipes/adapt.py --method cdan_e          # or cdan, mcc, mdd

The source (``source``: the embedded digits) is labelled; the target (``target_domain``: Digits-M, the
same digits blended with colour photo patches, see ``visrep.data.digits_m``) is seen without labels.
Each optimizer step takes a source batch and a target batch and minimises

    L = CE(h(f(x_s)), y_s) + w * D(f(x_s), f(x_t))

with ``D`` one of (``visrep.transfer``; ``h`` the classifier, ``g = softmax(h(f))``):
  source_only -- nothing (the source batch alone goes through the network);
  dann        -- the domain discriminator's loss behind a gradient reversal layer with
                 lambda_p = 2 / (1 + exp(-10 p)) - 1, p in optimizer steps (Ganin & Lempitsky 2015);
  mmd         -- unbiased multi-kernel MMD^2 of the bottleneck features (Long et al. 2015);
  coral       -- ||C_s - C_t||_F^2 / (4 d^2) of the bottleneck features (Sun & Saenko 2016);
  cdan        -- DANN's loss with the discriminator on the multilinear map f (x) g (g detached; randomized
                 above 4096 dimensions), same GRL schedule (Long et al. 2018);
  cdan_e      -- CDAN with each example's domain loss weighted by 1 + exp(-H(g)), normalised to mean 1;
  mcc         -- minimum class confusion of the target predictions softmax(h(f_t) / T), entropy-weighted
                 (Jin et al. 2020);
  mdd         -- minus the margin disparity discrepancy between h and an adversarial head h' behind the
                 GRL: gamma CE(h'(f_s), argmax h(f_s)) - log(1 - softmax(h'(f_t))[argmax h(f_t)]),
                 GRL schedule capped at ``mdd_grl_max`` (Zhang et al. 2019).
MMD, CORAL, MCC and CDAN+E's weights are batch statistics: ``adapt.sync`` says over which batch.

Model selection is honest: the reported ``target_acc`` is the model of the epoch with the best SOURCE
validation accuracy. Target test labels are used only to score the run; the per-epoch target accuracy
is logged as ``oracle/target_acc`` and its best value reported as ``oracle_target_acc`` -- an oracle
that no unsupervised user could select, printed as one.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Literal

import torch.nn.functional as F

from visrep.checks import ConfigError, check
from visrep.data import DataConfig, build_classification_data
from visrep.data.shards import ZippedStreams
from visrep.data.digits_m import load_digits_m_splits
from visrep.engine import (BackboneConfig, OptimConfig, RecipeConfig, Run, ScheduleConfig, build_optimizer,
                           evaluate_classifier)
from visrep.engine.export import export_model
from visrep.engine.run import read_metrics
from visrep.errors import main_entry
from visrep.launch import finish_run
from visrep.transfer import (AdaptationModel, BestOnValidation, CoralLoss, GRLSchedule, MinimumClassConfusionLoss,
                             MultiKernelMMDLoss, domain_adversarial_loss, entropy_weights, mdd_loss, paired_loader)
from visrep.zoo import create_backbone, get_data_config

PRESETS = Path(__file__).resolve().parent / "configs"
DISCRIMINATOR = ("dann", "cdan", "cdan_e")  # a domain discriminator behind the GRL
ADVERSARIAL = (*DISCRIMINATOR, "mdd")  # anything behind the GRL


@dataclasses.dataclass
class AdaptConfig:
    """Alignment hyper-parameters (the ones of the chosen method apply)."""

    bottleneck_dim: int = 128
    """Linear+BN+ReLU on the pooled backbone features; the aligned features. 0: none."""
    dann_weight: float = 1.0
    discriminator_hidden: int = 256
    grl_gamma: float = 10.0
    """lambda_p = 2 / (1 + exp(-grl_gamma * p)) - 1."""
    mmd_weight: float = 1.0
    mmd_multipliers: list[float] = dataclasses.field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])
    """Gaussian bandwidths as multiples of the heuristic squared distance."""
    mmd_heuristic: Literal["median", "mean"] = "median"
    coral_weight: float = 1.0
    cdan_weight: float = 1.0
    """cdan and cdan_e (the discriminator is ``discriminator_hidden`` wide)."""
    cdan_map: Literal["auto", "full", "randomized"] = "auto"
    """f (x) g in full, or randomized to ``cdan_randomized_dim``; auto: randomized above 4096 dims."""
    cdan_randomized_dim: int = 1024
    mcc_weight: float = 1.0
    mcc_temperature: float = 2.5
    mdd_weight: float = 1.0
    mdd_margin: float = 4.0
    """gamma, the margin factor of MDD."""
    mdd_grl_max: float = 0.1
    """MDD's GRL coefficient rises to this (Transfer-Learning-Library's MDD: 0.1)."""
    sync: Literal["gather", "local"] = "gather"
    """Across ranks, MMD/CORAL/MCC/CDAN+E weights on the batch gathered from all ranks (exact) or per rank."""

    def validate(self, prefix: str) -> None:
        for k in ("dann_weight", "mmd_weight", "coral_weight", "cdan_weight", "mcc_weight", "mdd_weight"):
            check(getattr(self, k) >= 0, prefix + k, getattr(self, k), "a number >= 0")
        for k in ("mcc_temperature", "mdd_margin", "mdd_grl_max", "cdan_randomized_dim"):
            check(getattr(self, k) > 0, prefix + k, getattr(self, k), "a number > 0")
        check(self.bottleneck_dim >= 0, f"{prefix}bottleneck_dim", self.bottleneck_dim, "an integer >= 0")
        check(len(self.mmd_multipliers) > 0 and all(m > 0 for m in self.mmd_multipliers),
              f"{prefix}mmd_multipliers", self.mmd_multipliers, "a non-empty list of positive numbers")


@dataclasses.dataclass
class AdaptRecipeConfig(RecipeConfig):
    output_dir: str = "runs/adapt"
    method: Literal["source_only", "dann", "mmd", "coral", "cdan", "cdan_e", "mcc", "mdd"] = "dann"
    source: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(hflip=0.0))
    """The labelled source domain (default: the embedded digits)."""
    target_domain: Literal["digits_m", "config"] = "digits_m"
    """digits_m: the embedded Digits-M (built with target's image_size/split settings); config: the
    source described by ``target`` (hf / imagefolder / digits). Its labels are never trained on."""
    target: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(hflip=0.0))
    model: BackboneConfig = dataclasses.field(default_factory=lambda: BackboneConfig(name="resnet20"))
    adapt: AdaptConfig = dataclasses.field(default_factory=AdaptConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)

    def validate(self, prefix: str) -> None:
        check(self.source.image_size == self.target.image_size, f"{prefix}target.image_size",
              self.target.image_size, f"the source's image_size ({self.source.image_size})")
        check(self.target.label_fraction == 1.0, f"{prefix}target.label_fraction", self.target.label_fraction,
              "1.0 (target labels are never trained on; the target train split is used unlabelled)")


def main(argv=None) -> dict:
    with Run.from_cli(AdaptRecipeConfig, "adapt", argv, PRESETS / "adapt_digits.yaml", __doc__) as run:
        cfg, accelerator = run.cfg, run.accelerator

        # ---- data: labelled source, unlabelled target (train), target test for scoring only ------
        backbone = create_backbone(cfg.model.name, pretrained=cfg.model.pretrained, num_classes=0,
                                   checkpoint=cfg.model.checkpoint, small_input=cfg.model.small_input,
                                   grad_checkpointing=cfg.model.grad_checkpointing, **cfg.model.kwargs)
        dc = get_data_config(backbone)
        bs, ebs, nw = cfg.run.batch_size, cfg.run.eval_batch_size, cfg.run.num_workers
        src = build_classification_data(cfg.source, dc, cfg.seed, bs, ebs, nw)
        tgt_splits = (load_digits_m_splits(cfg.target) if cfg.target_domain == "digits_m" and not cfg.target.streamed
                      else None)
        tgt = build_classification_data(cfg.target, dc, cfg.seed + 1, bs, ebs, nw, splits=tgt_splits)
        if tgt.classes != src.classes:
            raise ConfigError(f"source classes {src.classes} and target classes {tgt.classes} differ; closed-set "
                             f"adaptation needs one label space.")
        if cfg.method == "source_only":  # the very source batches the other methods see, no target decoding
            train_loader, epoch_setters = src.train_loader, src.epoch_setters
        elif cfg.source.streamed != cfg.target.streamed:
            raise ConfigError("source and target must both be streamed (shards, or hf with streaming) or both not: "
                              "a stream and an in-memory split cannot be paired batch by batch. Pack the other one "
                              "with `visrep data pack`.")
        elif cfg.source.streamed:  # two streams, each split by rank and worker
            train_loader, epoch_setters = ZippedStreams(src.train_loader, tgt.train_loader), ()
        else:
            train_loader, epoch_setters = paired_loader(src.train, tgt.train, cfg.seed, bs, nw)

        # ---- model: backbone -> bottleneck -> classifier (+ discriminator / adversarial head h') ------
        a = cfg.adapt
        disc_hidden = a.discriminator_hidden if cfg.method in DISCRIMINATOR else None
        condition = a.cdan_map if cfg.method in ("cdan", "cdan_e") else None
        model = AdaptationModel(backbone, src.num_classes, a.bottleneck_dim, disc_hidden, condition,
                                a.cdan_randomized_dim, adversarial_head=cfg.method == "mdd")
        optimizer = build_optimizer(model, cfg.optim)
        model, optimizer, train_loader, val_loader, src_test_loader, tgt_test_loader = run.prepare(
            model, optimizer, train_loader, src.val_loader, src.test_loader, tgt.test_loader,
            grad_clip=cfg.optim.grad_clip)
        best = BestOnValidation()
        align = {"mmd": MultiKernelMMDLoss(a.mmd_multipliers, a.mmd_heuristic, a.sync, same_size=True),
                 "coral": CoralLoss(a.sync, same_size=True),
                 "mcc": MinimumClassConfusionLoss(a.mcc_temperature, a.sync, same_size=True)}.get(cfg.method)
        weight = {"dann": a.dann_weight, "mmd": a.mmd_weight, "coral": a.coral_weight, "cdan": a.cdan_weight,
                  "cdan_e": a.cdan_weight, "mcc": a.mcc_weight, "mdd": a.mdd_weight}.get(cfg.method, 0.0)
        export_extra = {"model_type": "AdaptationModel", "bottleneck_dim": a.bottleneck_dim,
                        "discriminator_hidden": disc_hidden, "condition": condition,
                        "randomized_dim": a.cdan_randomized_dim, "adversarial_head": cfg.method == "mdd",
                        "method": cfg.method}
        stage = run.stage("adapt", model=model, optimizer=optimizer, train_loader=train_loader,
                          epochs=cfg.schedule.epochs, schedule=cfg.schedule, grad_clip=cfg.optim.grad_clip,
                          epoch_setters=epoch_setters, extra_state={"best": best},
                          export=lambda d: export_model(accelerator, model, d, cfg.model, src.num_classes, dc,
                                                        extra=export_extra, kind="adaptation"))
        grl = GRLSchedule(stage.total_steps, gamma=a.grl_gamma,  # lambda over optimizer steps
                          max_value=a.mdd_grl_max if cfg.method == "mdd" else 1.0)
        stage.track(grl=grl)
        unwrapped = accelerator.unwrap_model(model)
        epoch_times, oracle = [], []

        # ---- training ---------------------------------------------------------------------------
        for epoch in stage.epochs():
            model.train()
            t0 = time.perf_counter()
            for x, y_s in stage.batches():
                with accelerator.accumulate(model):
                    metrics = {}
                    if cfg.method == "source_only":
                        loss = cls_loss = F.cross_entropy(model(x).float(), y_s)
                    else:
                        x_s, x_t = x
                        out = model(x_s, x_t, grl_coeff=grl.value if cfg.method in ADVERSARIAL else None)
                        cls_loss = F.cross_entropy(out["logits_s"].float(), y_s)
                        if cfg.method in DISCRIMINATOR:
                            w = (entropy_weights(out["logits_s"], out["logits_t"], a.sync)
                                 if cfg.method == "cdan_e" else None)
                            transfer, metrics["disc_acc"] = domain_adversarial_loss(out["domain_s"], out["domain_t"],
                                                                                    w)
                        elif cfg.method == "mdd":
                            transfer = mdd_loss(out["logits_s"], out["adv_logits_s"], out["logits_t"],
                                                out["adv_logits_t"], a.mdd_margin)
                        elif cfg.method == "mcc":
                            transfer = align(out["logits_t"])
                        else:
                            transfer = align(out["features_s"], out["features_t"])
                        if cfg.method in ADVERSARIAL:
                            metrics["grl_lambda"] = grl.value
                        loss = cls_loss + weight * transfer
                        metrics["transfer_loss"] = transfer.detach()
                    accelerator.backward(loss)
                if stage.optimizer_step(loss, cls_loss=cls_loss, **metrics):
                    grl.step()
            epoch_times.append(time.perf_counter() - t0)
            # Selection on the SOURCE validation split; the target score is an oracle, logged as one.
            val = evaluate_classifier(model, val_loader, accelerator)
            tgt_now = evaluate_classifier(model, tgt_test_loader, accelerator)["top1"]
            best.update(unwrapped, val["top1"], epoch + 1)
            oracle.append(tgt_now)
            stage.epoch_done(source_val_acc=val["top1"], **{"oracle/target_acc": tgt_now},
                             epoch_time_s=epoch_times[-1])

        # ---- results: the source-val-selected model ----------------------------------------------
        if not stage.done:
            last_target = evaluate_classifier(model, tgt_test_loader, accelerator)["top1"]
            best.restore(unwrapped)
            val = evaluate_classifier(model, val_loader, accelerator)
            results = {
                "target_acc": evaluate_classifier(model, tgt_test_loader, accelerator)["top1"],
                "source_val_acc": val["top1"],
                "source_test_acc": evaluate_classifier(model, src_test_loader, accelerator)["top1"],
                "selected_epoch": best.best_epoch,
                "target_acc_last_epoch": last_target,
                "oracle_target_acc": max(_over_run(run, "oracle/target_acc", oracle), default=float("nan")),
                "time_per_epoch_s": _mean(_over_run(run, "epoch_time_s", epoch_times)),
            }
        else:
            results = None
        results = stage.finish(results)
        results = {"method": cfg.method, **{k: v for k, v in results.items() if k != "wall_time"},
                   "wall_s": results["wall_time"], "epochs": cfg.schedule.epochs,
                   "num_processes": accelerator.num_processes}
        return finish_run(run, results, format_summary(results), cfg.push_to_hub)


def _over_run(run: Run, key: str, this_session: list[float]) -> list[float]:
    """Per-epoch values of ``key`` over the whole run: metrics.jsonl (written by the main process)
    keeps the epochs before a resume; this session's values when it cannot be read."""
    seen = [float(rec[key]) for _, rec in read_metrics(run.run_dir / "metrics.jsonl")
            if rec.get("stage") == "adapt" and key in rec]
    return seen if len(seen) >= len(this_session) else list(this_session)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def format_summary(r: dict) -> str:
    tpe = r.get("time_per_epoch_s")
    return "\n".join([
        f"\nmethod {r['method']}: target test acc {r['target_acc']:.4f} (model of epoch {r['selected_epoch']}, "
        f"selected on source val acc {r['source_val_acc']:.4f}); source test acc {r['source_test_acc']:.4f}",
        f"last epoch: target test acc {r['target_acc_last_epoch']:.4f}"
        + (f"; {tpe:.1f} s/epoch" if tpe else ""),
        f"ORACLE (selected with target test labels -- not a valid result): {r['oracle_target_acc']:.4f}",
    ])


if __name__ == "__main__":
    main_entry(main)
