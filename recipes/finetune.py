"""Fine-tuning: carry a trained model to a new domain or task with few labels.

    accelerate launch recipes/finetune.py                     # digits model -> Digits-M with 10% of the labels
    accelerate launch recipes/finetune.py --finetune.strategy gradual --finetune.layer-decay 0.7
    accelerate launch recipes/finetune.py --init.source export --init.path RUN/models/kd     # a distilled student
    accelerate launch recipes/finetune.py --init.source safetensors --init.path byol.safetensors  # a BYOL backbone
        (--init.model.name / --init.model.kwargs.width: its architecture)
    accelerate launch recipes/finetune.py --init.source pretrained --init.model.name resnet18  # a zoo model

Stages, each checkpointed and resumable:
  0. source   -- (init.source=train) the model trained on the labelled source domain (the digits);
  1. probe    -- (strategy lp_ft / linear_probe) a linear probe: a new head on the frozen backbone;
  2. finetune -- (full / lp_ft / gradual) the whole model from there, with the freezing, layer-wise
                 LR decay and L2-SP of ``finetune``; gradual unfreezes one stage every
                 ``unfreeze_every`` epochs from the top (ULMFiT). LP-FT is Kumar et al. 2022,
                 "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution",
                 arXiv:2202.10054: probing first keeps a random head from distorting the features;
  3. scratch  -- (compare_scratch) the same architecture from random weights, same labels, same
                 number of target epochs: the baseline the transfer must beat.
Every stage keeps the epoch with the best accuracy on the TARGET VALIDATION split; test labels only
score the result.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

import torch
from accelerate.utils import set_seed

from visrep.data import DataConfig, build_classification_data, shards
from visrep.data.digits_m import load_digits_m_splits
from visrep.data.sources import class_names, load_splits
from visrep.engine import (OptimConfig, RecipeConfig, Run, ScheduleConfig, build_optimizer, count_parameters,
                           evaluate_classifier)
from visrep.launch import finish_run
from visrep.engine.distributed import require
from visrep.engine.export import export_model, load_model
from visrep.engine.supervised import SupervisedConfig, SupervisedObjective
from visrep.transfer import (L2SP, BestOnValidation, FreezeConfig, GradualUnfreezer, freeze,
                             layer_decay_param_groups, set_trainable)
from visrep.transfer.finetune import num_stages
from visrep.transfer.loading import InitConfig, build_start_model
from visrep.zoo import create_backbone, get_data_config
from visrep.errors import main_entry
from visrep.checks import check

PRESETS = Path(__file__).resolve().parent / "configs"


@dataclasses.dataclass
class FinetuneConfig:
    strategy: Literal["full", "linear_probe", "lp_ft", "gradual"] = "lp_ft"
    """full: train (all but ``freeze``) at once; linear_probe: the head only; lp_ft: probe, then full;
    gradual: head first, one more stage every ``unfreeze_every`` epochs."""
    freeze: FreezeConfig = dataclasses.field(default_factory=FreezeConfig)
    """Kept frozen throughout the fine-tuning stage (BatchNorm of frozen stages stays in eval mode)."""
    layer_decay: float = 1.0
    """Stage g of S gets lr * layer_decay ** (S - g); the head lr * head_lr_scale. 1.0: off."""
    head_lr_scale: float = 1.0
    lp_epochs: int = 5
    lp_optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=0.05, weight_decay=0.0))
    unfreeze_every: int = 1
    l2sp_alpha: float = 0.0
    """L2-SP weight toward the starting backbone weights (Li et al. 2018); 0: off. Use with weight_decay 0."""
    l2sp_beta: float = 0.0
    """L2 weight on the new head under L2-SP."""

    def validate(self, prefix: str) -> None:
        check(0 < self.layer_decay <= 1, f"{prefix}layer_decay", self.layer_decay, "a number in (0, 1]")
        check(self.lp_epochs >= 1 or self.strategy not in ("lp_ft", "linear_probe"), f"{prefix}lp_epochs",
              self.lp_epochs, "an integer >= 1 for lp_ft / linear_probe")
        check(self.unfreeze_every >= 1, f"{prefix}unfreeze_every", self.unfreeze_every, "an integer >= 1")
        check(self.l2sp_alpha >= 0 and self.l2sp_beta >= 0, f"{prefix}l2sp_alpha", self.l2sp_alpha,
              "numbers >= 0 (l2sp_alpha, l2sp_beta)")


@dataclasses.dataclass
class FinetuneRecipeConfig(RecipeConfig):
    output_dir: str = "runs/finetune"
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    source_data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(hflip=0.0))
    """The labelled source domain the starting model is trained on when init.source=train."""
    source_optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    target_domain: Literal["digits_m", "config"] = "digits_m"
    """digits_m: the embedded Digits-M built with ``data``'s settings; config: the source ``data`` describes."""
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(hflip=0.0, label_fraction=0.1))
    """The target task; ``label_fraction`` is the label budget."""
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=0.01))
    """Fine-tuning (and scratch-baseline) optimizer; ``lr`` is the peak rate of the head."""
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    """Fine-tuning epochs and LR shape (probe and source stages use the same shape)."""
    supervised: SupervisedConfig = dataclasses.field(default_factory=SupervisedConfig)
    """Label smoothing, MixUp / CutMix, auxiliary-classifier weight (every stage's cross-entropy)."""
    compare_scratch: bool = True
    scratch_optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=0.05))


def train_stage(run: Run, cfg: FinetuneRecipeConfig, name: str, model: torch.nn.Module, data, params,
                optim_cfg: OptimConfig, epochs: int, export_bb, unfreezer: Optional[GradualUnfreezer] = None,
                l2sp: Optional[L2SP] = None) -> tuple[torch.nn.Module, dict]:
    """Train ``model`` on ``data`` with cross-entropy (+ L2-SP), keep the epoch best on ``data``'s val split."""
    accelerator = run.accelerator
    objective = SupervisedObjective(cfg.supervised, data.num_classes, cfg.seed, accelerator.process_index)
    dc = get_data_config(model)
    optimizer = build_optimizer(params, optim_cfg)
    model, optimizer, train_loader, val_loader, test_loader = run.prepare(
        model, optimizer, data.train_loader, data.val_loader, data.test_loader, grad_clip=optim_cfg.grad_clip)
    best = BestOnValidation()
    extra = {"best": best, "unfreeze": unfreezer, "l2sp": l2sp}
    stage = run.stage(name, model=model, optimizer=optimizer, train_loader=train_loader, epochs=epochs,
                      schedule=cfg.schedule, grad_clip=optim_cfg.grad_clip,
                      epoch_setters=tuple(data.epoch_setters) + ((unfreezer,) if unfreezer else ()),
                      extra_state={k: v for k, v in extra.items() if v is not None},
                      export=lambda d: export_model(accelerator, model, d, export_bb, data.num_classes, dc))
    unwrapped = accelerator.unwrap_model(model)

    for epoch in stage.epochs():
        model.train()  # frozen BatchNorm layers stay in eval mode
        for x, y in stage.batches():
            with accelerator.accumulate(model):
                x, target = objective.mix(x, y, stage)  # MixUp / CutMix when configured
                metrics = objective(model, model(x), target)  # cross-entropy (+ auxiliary classifiers)
                loss = metrics.pop("loss")
                if l2sp is not None:
                    metrics["l2sp"] = reg = l2sp(unwrapped)
                    loss = loss + reg
                accelerator.backward(loss)
                if unfreezer is not None:
                    unfreezer.mask_grads()  # still-frozen stages: no update
            stage.optimizer_step(loss, **metrics)
        val = evaluate_classifier(model, val_loader, accelerator)
        best.update(unwrapped, val["top1"], epoch + 1)
        extra_log = {"trainable_from_stage": unfreezer.lowest_trainable(epoch)} if unfreezer else {}
        stage.epoch_done(val_acc=val["top1"], val_loss=val["loss"], **extra_log)

    results = None
    if not stage.done:
        best.restore(unwrapped)
        results = {"val_acc": evaluate_classifier(model, val_loader, accelerator)["top1"],
                   "test_acc": evaluate_classifier(model, test_loader, accelerator)["top1"],
                   "selected_epoch": best.best_epoch,
                   "trainable_params": count_parameters(unwrapped, trainable_only=True)}
    results = stage.finish(results)
    # The next stage starts from this stage's export: a plain module, whatever wrapped, hooked or
    # sharded this one during training (a DeepSpeed engine's hooks stay on the module it was given).
    model, _ = load_model(stage.model_dir)
    return model, results


def refuse_under_deepspeed(cfg: FinetuneRecipeConfig, accelerator) -> None:
    """What DeepSpeed cannot do here, refused before any training."""
    ft = cfg.finetune
    if ft.strategy == "gradual":  # drops the gradients of still-frozen stages before the optimizer step
        require(accelerator, "gradient_surgery", "finetune.strategy 'gradual'",
                "Under DeepSpeed use --finetune.strategy lp_ft or full; or unfreeze gradually under DDP "
                "(without --use_deepspeed).")
    if ft.l2sp_alpha or ft.l2sp_beta:  # a penalty on whole parameters, outside the model's forward
        require(accelerator, "whole_parameters", "L2-SP (finetune.l2sp_alpha / l2sp_beta)",
                "Under ZeRO-3 set --finetune.l2sp-alpha 0 --finetune.l2sp-beta 0 (weight decay instead); or use "
                "ZeRO-1/2 (--zero_stage 2) or DDP.")


def main(argv=None) -> dict:
    with Run.from_cli(FinetuneRecipeConfig, "finetune", argv, PRESETS / "finetune_digits.yaml", __doc__) as run:
        cfg, accelerator, ft = run.cfg, run.accelerator, run.cfg.finetune
        refuse_under_deepspeed(cfg, accelerator)
        bs, ebs, nw = cfg.run.batch_size, cfg.run.eval_batch_size, cfg.run.num_workers

        # ---- target data (the label budget is data.label_fraction) --------------------------------
        if cfg.data.streamed:  # target_domain does not apply; class names from the index
            splits, num_classes = None, len(shards.class_names_for(cfg.data))
        else:
            splits = load_digits_m_splits(cfg.data) if cfg.target_domain == "digits_m" else load_splits(cfg.data)
            num_classes = len(class_names(splits))

        # ---- 0. the starting model ---------------------------------------------------------------
        model, export_bb, info = build_start_model(cfg.init, num_classes)
        dc = get_data_config(model)
        target = build_classification_data(cfg.data, dc, cfg.seed, bs, ebs, nw, splits=splits)
        source_res: dict = {}
        if cfg.init.source == "train":
            source = build_classification_data(cfg.source_data, dc, cfg.seed, bs, ebs, nw)
            model.reset_classifier(source.num_classes)
            model, source_res = train_stage(run, cfg, "source", model, source, model, cfg.source_optim,
                                            cfg.init.train_epochs, export_bb)
            set_seed(cfg.seed)
        model.reset_classifier(num_classes)
        start_params = count_parameters(model)

        # ---- 1. linear probe ----------------------------------------------------------------------
        probe_res: dict = {}
        target_epochs = 0
        if ft.strategy in ("lp_ft", "linear_probe"):
            set_seed(cfg.seed)
            freeze(model, "all_but_head")
            model, probe_res = train_stage(run, cfg, "probe", model, target, model, ft.lp_optim, ft.lp_epochs,
                                           export_bb)
            target_epochs += ft.lp_epochs

        # ---- 2. fine-tune ---------------------------------------------------------------------------
        ft_res = probe_res
        if ft.strategy != "linear_probe":
            set_seed(cfg.seed)
            set_trainable(model, range(num_stages(model) + 1), True)
            freeze(model, ft.freeze)
            unfreezer = GradualUnfreezer(model, ft.unfreeze_every) if ft.strategy == "gradual" else None
            l2sp = L2SP(model, ft.l2sp_alpha, ft.l2sp_beta) if (ft.l2sp_alpha or ft.l2sp_beta) else None
            groups = layer_decay_param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, ft.layer_decay,
                                              ft.head_lr_scale)
            model, ft_res = train_stage(run, cfg, "finetune", model, target, groups, cfg.optim,
                                        cfg.schedule.epochs, export_bb, unfreezer=unfreezer, l2sp=l2sp)
            target_epochs += cfg.schedule.epochs

        # ---- 3. the same architecture from scratch, same labels, same target epochs ---------------
        scratch_res: dict = {}
        if cfg.compare_scratch:
            set_seed(cfg.seed)
            scratch = create_backbone(export_bb.name, num_classes=num_classes, small_input=export_bb.small_input,
                                      **export_bb.kwargs)
            _, scratch_res = train_stage(run, cfg, "scratch", scratch, target, scratch, cfg.scratch_optim,
                                         target_epochs, export_bb)

        # ---- results ------------------------------------------------------------------------------
        results = {
            "method": ft.strategy,
            "target_acc": ft_res["test_acc"],
            "target_val_acc": ft_res["val_acc"],
            "source_val_acc": source_res.get("val_acc"),
            "source_test_acc": source_res.get("test_acc"),
            "linear_probe_acc": probe_res.get("test_acc"),
            "scratch_target_acc": scratch_res.get("test_acc"),
            "transfer_gain": (ft_res["test_acc"] - scratch_res["test_acc"]) if scratch_res else None,
            "label_fraction": cfg.data.label_fraction,
            "train_labels": len(target.train),
            "init": info.get("from"),
            "params": start_params,
            "trainable_params": ft_res.get("trainable_params"),
            "selected_epoch": ft_res.get("selected_epoch"),
            "wall_s": sum(r.get("wall_time", 0.0) for r in (source_res, probe_res, ft_res, scratch_res) if r),
            "num_processes": accelerator.num_processes,
        }
        if ft.strategy == "linear_probe":
            results["target_val_acc"] = probe_res["val_acc"]
        return finish_run(run, results, format_summary(results), cfg.push_to_hub)


def format_summary(r: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"\nfine-tuning ({r['method']}, {r['train_labels']} target labels = {r['label_fraction']:.0%}) "
             f"from {r['init']}",
             f"  source model: val acc {f(r['source_val_acc'])}, test acc {f(r['source_test_acc'])}",
             f"  linear probe: target test acc {f(r['linear_probe_acc'])}",
             f"  fine-tuned:   target test acc {f(r['target_acc'])} (epoch {r['selected_epoch']}, chosen on "
             f"target val acc {f(r['target_val_acc'])})",
             f"  from scratch: target test acc {f(r['scratch_target_acc'])}"]
    if r["transfer_gain"] is not None:
        lines.append(f"  transfer gain over scratch: {r['transfer_gain']:+.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main_entry(main)
