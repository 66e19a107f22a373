"""Self-supervised pre-training, six ways: learn an encoder from unlabelled images, then measure it.

    accelerate launch recipes/selfsup.py --method simclr                # embedded digits, CPU-sized
    accelerate launch recipes/selfsup.py --method dino --dino.n-local 4
    accelerate launch recipes/selfsup.py --method mocov3 --resume latest --output-dir runs/ssl-mocov3
    python recipes/selfsup.py --eval-only runs/ssl-dino                 # offline kNN + linear eval

The methods (``visrep.ssl.methods``; every loss over the global batch across ranks):

  simclr -- SimCLR (Chen et al. 2020, arXiv:2002.05709): the two views of an image attract, the other
            2N - 2 views of the batch repel (NT-Xent on the projections);
  mocov3 -- MoCo v3 (Chen, Xie, He 2021, arXiv:2104.02057): queries (online projector + predictor) are
            matched to keys of a momentum encoder (an EMA of the online network) by InfoNCE;
  dino   -- DINO (Caron et al. 2021, arXiv:2104.14294): a student matches, on every crop, the centred and
            sharpened output of an EMA teacher on the two global crops (multi-crop: + n_local local crops);
  vicreg -- VICReg (Bardes, Ponce, LeCun 2022, arXiv:2105.04906): invariance between the views, a variance
            hinge and a covariance penalty per branch;
  barlow -- Barlow Twins (Zbontar et al. 2021, arXiv:2103.03230): the cross-correlation of the two views'
            standardised projections is driven to the identity;
  byol   -- BYOL (Grill et al. 2020, arXiv:2006.07733): the online network predicts the projection an EMA
            target gives of the other view (``recipes/byol.py`` is the same method on its own page).

No labels reach the encoder; they only feed an online linear probe on detached features (a progress
meter) and the final evaluation, whose protocol every run records in results.json (``eval_protocol``):

  0. random init   -- the same architecture, untrained: kNN and linear evaluation (the floor);
  1. pre-training  -- checkpointed, resumable (EMA momentum, teacher temperature and DINO's centre
                      included); kNN on the validation split logged every ``eval.every_epochs``;
  2. evaluation    -- weighted kNN and linear evaluation of the pre-trained encoder on frozen features, on
                      the test split, last epoch (never the best: nothing is selected on the test split).
                      The encoder alone is exported to RUN_DIR/models/METHOD/backbone.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from visrep.checks import check
from visrep.data import DataConfig, build_classification_data
from visrep.engine import BackboneConfig, RecipeConfig, Run, ScheduleConfig, count_parameters, parse_config
from visrep.engine.distributed import require
from visrep.errors import main_entry
from visrep.launch import finish_run
from visrep.ssl.optim import refuse_lars_under_deepspeed
from visrep.ssl import (LOSS_PATHS, METHODS, BarlowConfig, BatchedMultiCrop, BYOLConfig, DINOConfig, EMAUpdater,
                        MoCoV3Config, SimCLRConfig, SSLAugmentConfig, SSLEvalConfig, SSLOptimConfig, TeacherTemperature,
                        VICRegConfig, WeightDecaySchedule, bank_loader, barlow_twins_loss, base_transform, batch_seed,
                        build_backbone, build_method, build_ssl_optimizer, byol_loss, eval_protocol, evaluate_pretrained,
                        evaluate_representation, export_method, mocov3_loss, multicrop_transforms, nt_xent_loss,
                        offline_eval, results_table, validation_monitor, vicreg_loss)
from visrep.zoo import get_data_config

PRESETS = Path(__file__).resolve().parent / "configs"


@dataclasses.dataclass
class SSLRecipeConfig(RecipeConfig):
    method: str = "simclr"
    """The method trained: simclr, mocov3, dino, vicreg, barlow or byol; its group below holds its
    hyper-parameters (the other groups are ignored)."""
    output_dir: str = "runs/ssl-{method}"
    """The run directory; {method} is replaced by the method's name."""
    eval_only: Optional[str] = None
    """Offline evaluation only: kNN and linear evaluation of an exported encoder (its directory, or a run
    directory with models/METHOD/backbone) on the configured data; writes OUTPUT_DIR/eval_results.json."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: BackboneConfig = dataclasses.field(default_factory=lambda: BackboneConfig(name="resnet20"))
    simclr: SimCLRConfig = dataclasses.field(default_factory=SimCLRConfig)
    mocov3: MoCoV3Config = dataclasses.field(default_factory=MoCoV3Config)
    dino: DINOConfig = dataclasses.field(default_factory=DINOConfig)
    vicreg: VICRegConfig = dataclasses.field(default_factory=VICRegConfig)
    barlow: BarlowConfig = dataclasses.field(default_factory=BarlowConfig)
    byol: BYOLConfig = dataclasses.field(default_factory=BYOLConfig)
    augment: SSLAugmentConfig = dataclasses.field(default_factory=SSLAugmentConfig)
    optim: SSLOptimConfig = dataclasses.field(default_factory=SSLOptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    eval: SSLEvalConfig = dataclasses.field(default_factory=SSLEvalConfig)

    def validate(self, prefix: str) -> None:
        check(self.method in METHODS, f"{prefix}method", self.method, "one of " + ", ".join(METHODS))
        if self.method == "dino":
            check(self.dino.local_size <= self.data.image_size, f"{prefix}dino.local_size", self.dino.local_size,
                  f"at most data.image_size ({self.data.image_size}): local crops are the small ones")
            check(self.dino.warmup_teacher_temp_epochs <= self.schedule.epochs,
                  f"{prefix}dino.warmup_teacher_temp_epochs", self.dino.warmup_teacher_temp_epochs,
                  f"at most schedule.epochs ({self.schedule.epochs})")
            check(self.dino.freeze_last_layer <= self.schedule.epochs, f"{prefix}dino.freeze_last_layer",
                  self.dino.freeze_last_layer, f"at most schedule.epochs ({self.schedule.epochs})")
            check(self.dino.weight_decay_end is None or self.optim.weight_decay > 0, f"{prefix}dino.weight_decay_end",
                  self.dino.weight_decay_end, "null when optim.weight_decay is 0 (the cosine starts from "
                  "optim.weight_decay, on the groups that decay); or set optim.weight_decay > 0")


def refuse_under_deepspeed(cfg: SSLRecipeConfig, accelerator) -> None:
    """What DeepSpeed cannot do here, refused before any training: LARS, DINO's last-layer freeze."""
    refuse_lars_under_deepspeed(cfg.optim, accelerator)
    if cfg.method == "dino" and cfg.dino.freeze_last_layer > 0:  # drops gradients before the optimizer step
        require(accelerator, "gradient_surgery", "dino.freeze_last_layer > 0",
                "Under DeepSpeed use --dino.freeze-last-layer 0; or freeze the last layer under DDP.")


def ssl_loss(cfg: SSLRecipeConfig, net, out: dict, teacher_temp: Optional[float]) -> tuple[torch.Tensor, dict]:
    """The method's own loss on its forward's outputs, over the global batch (every rank's rows; the
    loaders drop incomplete batches, so every rank holds as many), and the terms to log."""
    hp = getattr(cfg, cfg.method)
    if cfg.method == "simclr":  # NT-Xent: the other view of the image against the other 2N - 2 views
        return nt_xent_loss(*out["z"], hp.temperature, same_size=True), {}
    if cfg.method == "mocov3":  # InfoNCE of each view's queries against the momentum keys of the other view
        return mocov3_loss(*out["q"], *out["k"], hp.temperature, same_size=True), {}
    if cfg.method == "dino":  # cross-entropy: centred, sharpened teacher (global crops) -> student (every other crop)
        return net.criterion(out["student"], out["teacher"], teacher_temp), {}
    if cfg.method == "vicreg":  # invariance + variance hinge + covariance, weighted
        terms = vicreg_loss(*out["z"], hp.sim_coeff, hp.std_coeff, hp.cov_coeff, same_size=True,
                            gram=LOSS_PATHS[hp.loss_path])
        return terms.pop("loss"), terms
    if cfg.method == "barlow":  # cross-correlation of the standardised views -> identity
        return barlow_twins_loss(*out["z"], hp.lambd, same_size=True, gram=LOSS_PATHS[hp.loss_path]), {}
    return byol_loss(*out["p"], *out["z_target"]), {}  # BYOL: predict the target's projection of the other view


def main(argv=None) -> dict:
    cfg = parse_config(SSLRecipeConfig, argv, default_preset=PRESETS / "ssl_digits.yaml", description=__doc__)
    cfg = dataclasses.replace(cfg, output_dir=cfg.output_dir.replace("{method}", cfg.method))
    if cfg.eval_only:
        return offline_eval(cfg, stages=METHODS)
    method, hp = cfg.method, getattr(cfg, cfg.method)  # hp: the method's hyper-parameters
    dino = method == "dino"
    with Run(cfg, "selfsup") as run:
        accelerator = run.accelerator
        backbone = build_backbone(cfg.model)
        size, chans = cfg.data.image_size, cfg.data.channels
        data_config = dict(get_data_config(backbone), input_size=(chans, size, size))

        # ---- data: two augmented views of every image (DINO: 2 global crops + n_local local crops) ---
        mean, std = data_config["mean"], data_config["std"]
        crops = dict(n_local=hp.n_local, local_size=hp.local_size, local_crop_scale=hp.local_crop_scale) if dino else {}
        on_device = cfg.augment.device == "accelerator"
        views = (base_transform(size) if on_device
                 else multicrop_transforms(cfg.augment, size, mean, std, chans, **crops))
        data = build_classification_data(cfg.data, data_config, cfg.seed, cfg.run.batch_size, cfg.run.eval_batch_size,
                                         cfg.run.num_workers, train_transform=views)
        device_views = (BatchedMultiCrop(cfg.augment, size, mean, std, chans, **crops).to(accelerator.device)
                        if on_device else None)

        # ---- model: the method's networks (+ EMA target / teacher, DINO's centre) + probe -----------
        random_init = copy.deepcopy(backbone)  # the floor: the very weights pre-training starts from
        model = build_method(method, hp, backbone, data.num_classes)
        if hp.sync_batchnorm and accelerator.num_processes > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        refuse_under_deepspeed(cfg, accelerator)
        global_batch = cfg.run.batch_size * accelerator.num_processes * cfg.run.grad_accum
        optimizer = build_ssl_optimizer(model, cfg.optim, global_batch)
        model, optimizer, train_loader, bank, val_loader, test_loader = run.prepare(
            model, optimizer, data.train_loader, bank_loader(cfg, data, data_config), data.val_loader,
            data.test_loader, grad_clip=cfg.optim.grad_clip)
        net = accelerator.unwrap_model(model)
        pairs = net.ema_pairs()  # (online, target): MoCo v3's key encoder, DINO's teacher, BYOL's target; else None

        # ---- 0. random init: the same architecture, untrained -------------------------------------
        floor = evaluate_representation(random_init.to(accelerator.device), bank, test_loader, accelerator,
                                        data.num_classes, cfg.eval, seed=cfg.seed)
        run.print(f"[{method}] random init: knn_acc={floor['knn_acc']:.4f} linear_acc={floor['linear_acc']:.4f}")

        # ---- 1. pre-training ------------------------------------------------------------------------
        stage = run.stage(method, model=model, optimizer=optimizer, train_loader=train_loader,
                          epochs=cfg.schedule.epochs, schedule=cfg.schedule, grad_clip=cfg.optim.grad_clip,
                          epoch_setters=data.epoch_setters,
                          export=lambda d: export_method(accelerator, model, d, method, cfg.model, data_config, hp))
        # what changes once per optimizer step, checkpointed with the stage: EMA momentum (cosine), DINO's
        # teacher temperature (linear warm-up); DINO's centre is a buffer of the model
        ema = EMAUpdater(stage.total_steps, hp.base_tau, hp.final_tau) if pairs else None
        temp = (TeacherTemperature(round(hp.warmup_teacher_temp_epochs * stage.steps_per_epoch),
                                   hp.warmup_teacher_temp, hp.teacher_temp) if dino else None)
        stage.track(**{k: v for k, v in (("ema", ema), ("teacher_temp", temp)) if v is not None})
        # DINO's weight decay on a cosine and last-layer freeze: functions of the optimizer step, like the rate
        wd_schedule = dino and hp.weight_decay_end is not None
        if wd_schedule:
            stage.schedule = WeightDecaySchedule(stage.schedule, stage.total_steps, cfg.optim.weight_decay,
                                                 hp.weight_decay_end)
        freeze_steps = round(hp.freeze_last_layer * stage.steps_per_epoch) if dino else 0
        run.print(f"[{method}] global batch {global_batch} = {cfg.run.batch_size} x {accelerator.num_processes} "
                  f"process(es) x {cfg.run.grad_accum} accumulation; peak lr "
                  f"{optimizer.param_groups[0]['initial_lr']:.4g} ({cfg.optim.name}); {stage.total_steps} steps")

        teacher_out = []  # DINO: the teacher's outputs in this optimizer step's micro-batches (for the centre)
        for epoch in stage.epochs():
            model.train()
            for views_batch, y in stage.batches():
                if device_views is not None:
                    views_batch = device_views(views_batch, batch_seed(cfg.seed, stage.epoch, stage.batch_in_epoch,
                                                                       accelerator.process_index))
                stage.record_samples(views_batch, data_config, global_views=2)  # as the model sees it, for the report
                in_effect = {**({"tau": ema.tau} if ema else {}), **({"teacher_temp": temp.value} if dino else {}),
                             **({"weight_decay": optimizer.param_groups[0]["weight_decay"]} if wd_schedule else {})}
                with accelerator.accumulate(model):
                    out = model(*views_batch)  # views -> projections / predictions / teacher outputs, probe logits
                    loss, terms = ssl_loss(cfg, net, out, temp.value if dino else None)  # the paper's loss, above
                    probe_loss = F.cross_entropy(out["logits"].float(), y)  # detached features: no gradient to f
                    accelerator.backward(loss + probe_loss)
                    if stage.step < freeze_steps:
                        net.cancel_last_layer_gradients()  # DINO: the last layer is fixed for freeze_last_layer epochs
                if dino:
                    teacher_out.append(out["teacher"])
                if stage.optimizer_step(loss, probe_loss=probe_loss, **terms, **in_effect):
                    if ema is not None:
                        ema.update(*pairs)  # target <- tau target + (1 - tau) online, once per optimizer step
                    if dino:
                        net.criterion.update_center(teacher_out)  # c <- m c + (1 - m) mean of the step's global batch
                        teacher_out.clear()
                        temp.tick()  # the next step's teacher temperature
            metrics = {**({"tau": ema.last_tau} if ema else {}), **({"teacher_temp": temp.last} if dino else {})}
            if cfg.eval.every_epochs and (stage.epoch + 1) % cfg.eval.every_epochs == 0:
                metrics.update(validation_monitor(net, model, bank, val_loader, accelerator, data.num_classes,
                                                  cfg.eval))
            stage.epoch_done(**metrics)

        # ---- 2. evaluation of the pre-trained encoder (last epoch) ---------------------------------
        figures = evaluate_pretrained(net, model, net.project, bank, val_loader, test_loader, accelerator,
                                      data.num_classes, cfg.eval, floor, seed=cfg.seed)
        res = stage.finish({"knn_acc": figures["knn_acc"], "linear_acc": figures["linear_acc"]})
        hyperparameters = {method: hp, "augment": cfg.augment, "optim": cfg.optim, "schedule": cfg.schedule,
                           "global_batch": global_batch}
        results = {
            "method": method,
            **figures,
            "backbone_params": count_parameters(random_init),
            "pretrain_wall_s": res["wall_time"],
            "steps": stage.step,
            "global_batch": global_batch,
            "peak_lr": optimizer.param_groups[0]["initial_lr"],
            **({"final_tau": ema.last_tau} if ema else {}),
            **({"final_teacher_temp": temp.last} if temp else {}),
            "num_processes": accelerator.num_processes,
            "backbone_path": str(stage.model_dir / "backbone"),
            "eval_protocol": eval_protocol(cfg.eval, cfg.seed, method, hyperparameters, cfg.data),
        }
        return finish_run(run, results, format_table(results, cfg), cfg.push_to_hub)


TITLES = {"simclr": "SimCLR", "mocov3": "MoCo v3", "dino": "DINO", "vicreg": "VICReg", "barlow": "Barlow Twins",
          "byol": "BYOL"}


def format_table(r: dict, cfg: SSLRecipeConfig) -> str:
    return results_table(r, f"{TITLES[r['method']]} pre-trained", cfg.model, cfg.eval)


if __name__ == "__main__":
    main_entry(main)
