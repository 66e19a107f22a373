"""BYOL self-supervised pre-training: learn an encoder from unlabelled images, then measure it.

    accelerate launch recipes/byol.py                                  # embedded digits, CPU-sized
    accelerate launch recipes/byol.py --config recipes/configs/byol_digits.yaml --optim.lr 0.5
    accelerate launch recipes/byol.py --resume latest --output-dir runs/byol
    python recipes/byol.py --eval-only runs/byol/models/byol/backbone      # offline kNN + linear eval

Bootstrap Your Own Latent (Grill et al. 2020, arXiv:2006.07733): an online network (backbone f,
projector g, predictor q) learns to predict, from one augmented view of an image, the projection
that a target network (f', g') gives of another view; the target is an exponential moving average of
the online weights, never trained by gradients. No labels are used for the encoder; the labels only
feed an online linear probe on detached features (a progress meter) and the final evaluation:

  0. random init -- the same architecture, untrained: kNN and linear evaluation (the floor);
  1. byol        -- pre-training (checkpointed, resumable); kNN on the validation split and the
                    collapse monitor (std of the normalised projections) logged every epoch;
  2. evaluation  -- weighted kNN and linear evaluation of the pre-trained encoder on frozen features,
                    on the test split, last epoch (never the best). The encoder alone is exported
                    to RUN_DIR/models/byol/backbone (safetensors, zoo / timm key names).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from visrep.data import DataConfig, build_classification_data
from visrep.engine import BackboneConfig, RecipeConfig, Run, ScheduleConfig, count_parameters, parse_config
from visrep.errors import main_entry
from visrep.launch import finish_run
from visrep.ssl.optim import refuse_lars_under_deepspeed
from visrep.ssl import (BYOL, BYOLConfig, BatchedBYOLAugment, EMAUpdater, SSLAugmentConfig, SSLEvalConfig,
                        SSLOptimConfig, bank_loader, base_transform, batch_seed, build_backbone, build_ssl_optimizer,
                        byol_loss, byol_transforms, eval_protocol, evaluate_pretrained, evaluate_representation,
                        export_byol, normalized_std, offline_eval, results_table, validation_monitor)
from visrep.zoo import get_data_config

PRESETS = Path(__file__).resolve().parent / "configs"


@dataclasses.dataclass
class BYOLRecipeConfig(RecipeConfig):
    output_dir: str = "runs/byol"
    eval_only: Optional[str] = None
    """Offline evaluation only: kNN and linear evaluation of an exported encoder (a directory with
    model.safetensors + config.json, e.g. RUN_DIR/models/byol/backbone, or a BYOL run directory) on
    the configured data; writes OUTPUT_DIR/eval_results.json."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: BackboneConfig = dataclasses.field(default_factory=lambda: BackboneConfig(name="resnet20"))
    byol: BYOLConfig = dataclasses.field(default_factory=BYOLConfig)
    augment: SSLAugmentConfig = dataclasses.field(default_factory=SSLAugmentConfig)
    optim: SSLOptimConfig = dataclasses.field(default_factory=SSLOptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    eval: SSLEvalConfig = dataclasses.field(default_factory=SSLEvalConfig)


eval_loaders = bank_loader  # the training split under the evaluation transform (kNN bank / linear-eval training set)


def refuse_under_deepspeed(cfg: BYOLRecipeConfig, accelerator) -> None:
    """What DeepSpeed cannot do here, refused before any training: LARS."""
    refuse_lars_under_deepspeed(cfg.optim, accelerator)


def main(argv=None) -> dict:
    cfg = parse_config(BYOLRecipeConfig, argv, default_preset=PRESETS / "byol_digits.yaml", description=__doc__)
    if cfg.eval_only:
        return offline_eval(cfg, stages=("byol",))
    with Run(cfg, "byol") as run:
        accelerator = run.accelerator
        backbone = build_backbone(cfg.model)
        size, chans = cfg.data.image_size, cfg.data.channels
        data_config = dict(get_data_config(backbone), input_size=(chans, size, size))

        # ---- data: two augmented views of every image --------------------------------------------
        mean, std = data_config["mean"], data_config["std"]
        on_device = cfg.augment.device == "accelerator"
        views = base_transform(size) if on_device else byol_transforms(cfg.augment, size, mean, std, chans)
        data = build_classification_data(cfg.data, data_config, cfg.seed, cfg.run.batch_size, cfg.run.eval_batch_size,
                                         cfg.run.num_workers, train_transform=views)
        device_views = BatchedBYOLAugment(cfg.augment, size, mean, std, chans).to(accelerator.device) if on_device else None

        # ---- model: online (f, g, q) + EMA target (f', g') + probe; LARS at the scaled rate --------
        random_init = copy.deepcopy(backbone)  # the floor: the very weights BYOL starts from
        model = BYOL(backbone, cfg.byol.proj_hidden_dim, cfg.byol.proj_dim, cfg.byol.pred_hidden_dim,
                     num_classes=data.num_classes, batch_norm=cfg.byol.head_batch_norm)
        if cfg.byol.sync_batchnorm and accelerator.num_processes > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        refuse_under_deepspeed(cfg, accelerator)
        global_batch = cfg.run.batch_size * accelerator.num_processes * cfg.run.grad_accum
        optimizer = build_ssl_optimizer(model, cfg.optim, global_batch)
        model, optimizer, train_loader, bank, val_loader, test_loader = run.prepare(
            model, optimizer, data.train_loader, eval_loaders(cfg, data, data_config), data.val_loader,
            data.test_loader, grad_clip=cfg.optim.grad_clip)
        net = accelerator.unwrap_model(model)
        online, target = net.ema_pairs()

        # ---- 0. random init: the same architecture, untrained ------------------------------------
        floor = evaluate_representation(random_init.to(accelerator.device), bank, test_loader, accelerator,
                                        data.num_classes, cfg.eval, seed=cfg.seed)
        run.print(f"[byol] random init: knn_acc={floor['knn_acc']:.4f} linear_acc={floor['linear_acc']:.4f}")

        # ---- 1. BYOL pre-training -------------------------------------------------------------------
        stage = run.stage("byol", model=model, optimizer=optimizer, train_loader=train_loader,
                          epochs=cfg.schedule.epochs, schedule=cfg.schedule, grad_clip=cfg.optim.grad_clip,
                          epoch_setters=data.epoch_setters,
                          export=lambda d: export_byol(accelerator, model, d, cfg.model, data_config))
        ema = EMAUpdater(stage.total_steps, cfg.byol.base_tau, cfg.byol.final_tau)  # counted in optimizer steps
        stage.track(ema=ema)
        run.print(f"[byol] global batch {global_batch} = {cfg.run.batch_size} x {accelerator.num_processes} "
                  f"process(es) x {cfg.run.grad_accum} accumulation; peak lr "
                  f"{optimizer.param_groups[0]['initial_lr']:.4g} ({cfg.optim.name}); {stage.total_steps} steps")

        for epoch in stage.epochs():
            model.train()
            for views_batch, y in stage.batches():
                if device_views is not None:
                    v1, v2 = device_views(views_batch, batch_seed(cfg.seed, stage.epoch, stage.batch_in_epoch,
                                                                  accelerator.process_index))
                else:
                    v1, v2 = views_batch
                stage.record_samples([v1, v2], data_config)  # the first batch, as the model sees it: for the report
                with accelerator.accumulate(model):
                    out = model(v1, v2)
                    (p1, p2), (z1_t, z2_t) = out["p"], out["z_target"]
                    loss = byol_loss(p1, p2, z1_t, z2_t)  # predict the target's view-2 projection from view 1, and back
                    probe_loss = F.cross_entropy(out["logits"].float(), y)  # detached features: no gradient to f
                    accelerator.backward(loss + probe_loss)
                if stage.optimizer_step(loss, probe_loss=probe_loss, z_std=normalized_std(out["z"][0]), tau=ema.tau):
                    ema.update(online, target)  # target <- tau target + (1 - tau) online, once per optimizer step
            metrics = {"tau": ema.last_tau}
            if cfg.eval.every_epochs and (stage.epoch + 1) % cfg.eval.every_epochs == 0:
                metrics.update(validation_monitor(net, model, bank, val_loader, accelerator, data.num_classes,
                                                  cfg.eval))
            stage.epoch_done(**metrics)

        # ---- 2. evaluation of the pre-trained encoder (last epoch) ---------------------------------
        figures = evaluate_pretrained(net, model, lambda x: net.projector(net.encode(x)), bank, val_loader,
                                      test_loader, accelerator, data.num_classes, cfg.eval, floor, seed=cfg.seed)
        res = stage.finish({"knn_acc": figures["knn_acc"], "linear_acc": figures["linear_acc"]})
        hyperparameters = {"byol": cfg.byol, "augment": cfg.augment, "optim": cfg.optim, "schedule": cfg.schedule,
                           "global_batch": global_batch}
        results = {
            **figures,
            "backbone_params": count_parameters(random_init),
            "pretrain_wall_s": res["wall_time"],
            "steps": stage.step,
            "global_batch": global_batch,
            "peak_lr": optimizer.param_groups[0]["initial_lr"],
            "final_tau": ema.last_tau,
            "num_processes": accelerator.num_processes,
            "backbone_path": str(stage.model_dir / "backbone"),
            "eval_protocol": eval_protocol(cfg.eval, cfg.seed, "byol", hyperparameters, cfg.data),
        }
        return finish_run(run, results, format_table(results, cfg), cfg.push_to_hub)


def format_table(r: dict, cfg: BYOLRecipeConfig) -> str:
    return results_table(r, "BYOL pre-trained", cfg.model, cfg.eval)


if __name__ == "__main__":
    main_entry(main)
