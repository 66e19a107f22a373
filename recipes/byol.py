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
import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from visrep.data import DataConfig, ImageDataset, build_classification_data, build_transforms, collate, loader_options
from visrep.engine import (BackboneConfig, RecipeConfig, Run, ScheduleConfig, count_parameters, evaluate_classifier,
                           parse_config)
from visrep.engine.distributed import require
from visrep.engine.export import load_model
from visrep.errors import main_entry
from visrep.launch import finish_run
from visrep.ssl import (BYOL, BYOLConfig, BatchedBYOLAugment, EMAUpdater, SSLAugmentConfig, SSLEvalConfig,
                        SSLOptimConfig, base_transform, batch_seed, build_ssl_optimizer, byol_loss, byol_transforms,
                        evaluate_representation, export_byol, extract_features, normalized_std)
from visrep.zoo import create_backbone, get_data_config

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


def build_backbone(bb: BackboneConfig) -> torch.nn.Module:
    return create_backbone(bb.name, pretrained=bb.pretrained, num_classes=0, checkpoint=bb.checkpoint,
                           small_input=bb.small_input, **bb.kwargs,
                           grad_checkpointing=bb.grad_checkpointing)


def eval_loaders(cfg: BYOLRecipeConfig, data, data_config: dict):
    """The training split under the evaluation transform (the kNN bank / linear-eval training set)."""
    dc = dict(data_config, input_size=(cfg.data.channels, cfg.data.image_size, cfg.data.image_size))
    tf = build_transforms(dc, cfg.data.image_size, train=False)
    bank = ImageDataset(data.bank_split(), tf, "RGB" if cfg.data.channels == 3 else "L", "train")
    return torch.utils.data.DataLoader(bank, batch_size=cfg.run.eval_batch_size, shuffle=False,
                                       **loader_options(cfg.run.num_workers, collate))


def refuse_under_deepspeed(cfg: BYOLRecipeConfig, accelerator) -> None:
    """What DeepSpeed cannot do here, refused before any training."""
    if cfg.optim.name == "lars":
        require(accelerator, "per_layer_optimizer", "optim.name 'lars' (a trust ratio per layer)",
                "Under DeepSpeed use --optim.name sgd or adamw; or train with LARS under DDP (without --use_deepspeed).")


def main(argv=None) -> dict:
    cfg = parse_config(BYOLRecipeConfig, argv, default_preset=PRESETS / "byol_digits.yaml", description=__doc__)
    if cfg.eval_only:
        return offline_eval(cfg)
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
        model, optimizer, train_loader, bank_loader, val_loader, test_loader = run.prepare(
            model, optimizer, data.train_loader, eval_loaders(cfg, data, data_config), data.val_loader,
            data.test_loader, grad_clip=cfg.optim.grad_clip)
        net = accelerator.unwrap_model(model)
        online, target = net.ema_pairs()

        # ---- 0. random init: the same architecture, untrained ------------------------------------
        floor = evaluate_representation(random_init.to(accelerator.device), bank_loader, test_loader, accelerator,
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
                knn = evaluate_representation(net.encode, bank_loader, val_loader, accelerator, data.num_classes,
                                              cfg.eval, module=model, linear=False)
                probe = evaluate_classifier(model, val_loader, accelerator, forward=lambda x: net.probe(net.encode(x)))
                metrics.update(val_knn_acc=knn["knn_acc"], val_probe_acc=probe["top1"])
            stage.epoch_done(**metrics)

        # ---- 2. evaluation of the pre-trained encoder (last epoch) ---------------------------------
        final = evaluate_representation(net.encode, bank_loader, test_loader, accelerator, data.num_classes, cfg.eval,
                                        module=model, seed=cfg.seed)
        probe = evaluate_classifier(model, test_loader, accelerator, forward=lambda x: net.probe(net.encode(x)))
        z_std = collapse_monitor(net, val_loader, accelerator)
        res = stage.finish({"knn_acc": final["knn_acc"], "linear_acc": final["linear_acc"]})

        results = {
            "knn_acc": final["knn_acc"],
            "linear_acc": final["linear_acc"],
            "random_init_knn_acc": floor["knn_acc"],
            "random_init_linear_acc": floor["linear_acc"],
            "online_probe_acc": probe["top1"],
            "knn_gain": final["knn_acc"] - floor["knn_acc"],
            "linear_gain": final["linear_acc"] - floor["linear_acc"],
            "z_std": z_std,
            "z_std_uniform": cfg.byol.proj_dim ** -0.5,
            "backbone_params": count_parameters(random_init),
            "pretrain_wall_s": res["wall_time"],
            "steps": stage.step,
            "global_batch": global_batch,
            "peak_lr": optimizer.param_groups[0]["initial_lr"],
            "final_tau": ema.last_tau,
            "num_processes": accelerator.num_processes,
            "backbone_path": str(stage.model_dir / "backbone"),
        }
        return finish_run(run, results, format_table(results, cfg), cfg.push_to_hub)


@torch.no_grad()
def collapse_monitor(net: BYOL, loader, accelerator) -> float:
    """Std of the L2-normalised online projections over the whole split (eval mode); 0 = collapse."""
    z, _ = extract_features(lambda x: net.projector(net.encode(x)), loader, accelerator, module=net)
    return normalized_std(z).item()


def offline_eval(cfg: BYOLRecipeConfig) -> dict:
    """``--eval-only PATH``: kNN and linear evaluation of an exported encoder on frozen features."""
    path = Path(cfg.eval_only)
    if (path / "models" / "byol" / "backbone").is_dir():
        path = path / "models" / "byol" / "backbone"
    encoder, meta = load_model(path)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    data_config = dict(get_data_config(encoder), input_size=(cfg.data.channels, cfg.data.image_size,
                                                             cfg.data.image_size))
    data = build_classification_data(cfg.data, data_config, cfg.seed, cfg.run.batch_size, cfg.run.eval_batch_size,
                                     cfg.run.num_workers)
    encoder, bank_loader, test_loader = accelerator.prepare(encoder, eval_loaders(cfg, data, data_config),
                                                            data.test_loader)
    res = evaluate_representation(encoder, bank_loader, test_loader, accelerator, data.num_classes, cfg.eval,
                                  seed=cfg.seed)
    res = {"knn_acc": res["knn_acc"], "linear_acc": res["linear_acc"], "linear_train_acc": res["linear_train_acc"],
           "encoder": str(path), "architecture": meta["architecture"]}
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_results.json").write_text(json.dumps(res, indent=2))
    accelerator.print(f"{meta['architecture']} from {path}: knn_acc={res['knn_acc']:.4f} "
                      f"linear_acc={res['linear_acc']:.4f} (k={cfg.eval.knn_k}, T={cfg.eval.knn_t}, "
                      f"{cfg.eval.linear_epochs} linear epochs)")
    return res


def format_table(r: dict, cfg: BYOLRecipeConfig) -> str:
    arch = cfg.model.name + (f" {cfg.model.kwargs}" if cfg.model.kwargs else "")
    lines = [f"\nencoder: {arch}, {r['backbone_params']:,} parameters; test split",
             f"{'encoder':<28}{'kNN acc':>10}{'linear acc':>12}", "-" * 50,
             f"{'BYOL pre-trained':<28}{r['knn_acc']:>10.4f}{r['linear_acc']:>12.4f}",
             f"{'random init (same arch)':<28}{r['random_init_knn_acc']:>10.4f}{r['random_init_linear_acc']:>12.4f}",
             f"{'gain':<28}{r['knn_gain']:>+10.4f}{r['linear_gain']:>+12.4f}",
             f"online probe acc {r['online_probe_acc']:.4f}; collapse monitor z_std {r['z_std']:.4f} "
             f"(uniform on the sphere: {r['z_std_uniform']:.4f}); {r['steps']} steps, "
             f"{r['pretrain_wall_s']:.1f}s pre-training",
             f"encoder exported to {r['backbone_path']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main_entry(main)
