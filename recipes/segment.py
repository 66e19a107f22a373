"""Semantic segmentation: fine-tune any zoo backbone with an FPN or U-Net head, one label per pixel.

    accelerate launch recipes/segment.py                      # Digits-M segmentation, ResNet-20 from random init, FPN
    accelerate launch recipes/segment.py --head.neck unet
    accelerate launch recipes/segment.py --init.source export --init.path RUN/models/simclr/backbone  # an SSL encoder
    accelerate launch recipes/segment.py --init.source export --init.path RUN/models/kd               # a distilled student
    accelerate launch recipes/segment.py --init.source safetensors --init.path byol.safetensors  # a backbone state dict
        (--init.model.name / --init.model.kwargs.width: its architecture)
    accelerate launch recipes/segment.py --init.source pretrained --init.model.name resnet18     # a zoo model

The task (``visrep.data.segmentation``): Digits-M images (a digit blended with a colour photo patch), every
stroke pixel labelled with its digit (grey level >= data.stroke_threshold), the rest background: 11 classes;
the blurred stroke edge is ignored. Splits are the digits' own, built offline.

One stage, checkpointed and resumable:
  segment -- the backbone's features_only pyramid -> FPN / U-Net neck -> 1x1 classifier -> upsampling to the
             input (visrep.transfer.dense.SegmentationModel), trained end to end with per-pixel cross-entropy
             (ignored pixels left out). The epoch with the best mean IoU on the VALIDATION split is kept and
             exported (kind ``segmentation``); the test split only scores it: ``miou`` and ``pixel_acc``, each
             from one confusion matrix summed over the split (and the ranks) before dividing.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from visrep.checks import check
from visrep.data.segmentation import SegmentationDataConfig, build_segmentation_data
from visrep.engine import (BackboneConfig, OptimConfig, RecipeConfig, Run, ScheduleConfig, build_optimizer,
                           count_parameters)
from visrep.errors import main_entry
from visrep.launch import finish_run
from visrep.transfer import BestOnValidation
from visrep.transfer.dense import (DenseHeadConfig, SegmentationModel, evaluate_segmentation, export_segmentation,
                                   segmentation_loss)
from visrep.transfer.loading import InitConfig, build_start_model
from visrep.zoo import get_data_config

PRESETS = Path(__file__).resolve().parent / "configs"


@dataclasses.dataclass
class SegmentRecipeConfig(RecipeConfig):
    output_dir: str = "runs/segment"
    init: InitConfig = dataclasses.field(default_factory=lambda: InitConfig(
        source="scratch", model=BackboneConfig(name="resnet20", small_input=True)))
    """Where the backbone starts: scratch, pretrained, export (RUN_DIR/models/STAGE: an SSL encoder, a KD
    student, a classifier) or safetensors (a backbone state dict loaded into init.model)."""
    data: SegmentationDataConfig = dataclasses.field(default_factory=SegmentationDataConfig)
    head: DenseHeadConfig = dataclasses.field(default_factory=DenseHeadConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=0.05))
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)

    def validate(self, prefix: str) -> None:
        check(self.init.source != "train", f"{prefix}init.source", self.init.source,
              "scratch, pretrained, export or safetensors (segment.py trains no source model: train one with "
              "recipes/finetune.py, distill.py or selfsup.py and pass its export with --init.source export)")
        check(self.schedule.epochs >= 1, f"{prefix}schedule.epochs", self.schedule.epochs, "an integer >= 1")


def main(argv=None) -> dict:
    with Run.from_cli(SegmentRecipeConfig, "segment", argv, PRESETS / "segment_digits.yaml", __doc__) as run:
        cfg, accelerator = run.cfg, run.accelerator

        # ---- the backbone (random, pretrained, or an export of another recipe) and its dense head -------
        backbone, export_bb, info = build_start_model(cfg.init, 0)
        levels = len(backbone.feature_info)
        check(all(-levels <= i < levels for i in cfg.head.out_indices or ()), "head.out_indices",
              cfg.head.out_indices, f"indices into the {levels} feature levels of {export_bb.name} (0..{levels - 1}, "
              f"or negative from the end)")
        dc = get_data_config(backbone)
        data = build_segmentation_data(cfg.data, dc, cfg.seed, cfg.run.batch_size, cfg.run.eval_batch_size,
                                       cfg.run.num_workers)
        model = SegmentationModel(backbone, data.num_classes, cfg.head)
        params = count_parameters(model)
        global_batch = cfg.run.batch_size * accelerator.num_processes * cfg.run.grad_accum
        optimizer = build_optimizer(model, cfg.optim, global_batch)
        model, optimizer, train_loader, val_loader, test_loader = run.prepare(
            model, optimizer, data.train_loader, data.val_loader, data.test_loader, grad_clip=cfg.optim.grad_clip)
        best = BestOnValidation()  # the epoch with the best validation mIoU; saved with every checkpoint
        stage = run.stage("segment", model=model, optimizer=optimizer, train_loader=train_loader,
                          epochs=cfg.schedule.epochs, schedule=cfg.schedule, grad_clip=cfg.optim.grad_clip,
                          epoch_setters=data.epoch_setters, extra_state={"best": best},
                          export=lambda d: export_segmentation(accelerator, model, d, export_bb, data.num_classes, dc,
                                                               cfg.head, {"classes": data.classes,
                                                                          "ignore_index": data.ignore_index}))
        unwrapped = accelerator.unwrap_model(model)
        score = lambda loader: evaluate_segmentation(model, loader, accelerator, data.num_classes,  # noqa: E731
                                                     data.ignore_index)

        # ---- training: per-pixel cross-entropy, ignored pixels left out ------------------------------------
        for epoch in stage.epochs():
            model.train()
            for x, y in stage.batches():
                with accelerator.accumulate(model):
                    loss = segmentation_loss(model(x), y, data.ignore_index)
                    accelerator.backward(loss)
                stage.optimizer_step(loss)
            val = score(val_loader)
            best.update(unwrapped, val["miou"], epoch + 1)
            stage.epoch_done(val_miou=val["miou"], val_pixel_acc=val["pixel_acc"], val_loss=val["loss"])

        # ---- the epoch best on validation, scored once on test ---------------------------------------------
        res = None
        if not stage.done:
            best.restore(unwrapped)
            val, test = score(val_loader), score(test_loader)
            res = {"val_miou": val["miou"], "val_pixel_acc": val["pixel_acc"], "miou": test["miou"],
                   "pixel_acc": test["pixel_acc"], "test_loss": test["loss"], "test_iou": test["iou"],
                   "selected_epoch": best.best_epoch}
        res = stage.finish(res)

        # ---- results ------------------------------------------------------------------------------------
        results = {
            "miou": res["miou"],
            "pixel_acc": res["pixel_acc"],
            "val_miou": res["val_miou"],
            "val_pixel_acc": res["val_pixel_acc"],
            "test_loss": res["test_loss"],
            "test_iou": res["test_iou"],
            "selected_epoch": res["selected_epoch"],
            "init": info.get("from"),
            "backbone": export_bb.name,
            "neck": cfg.head.neck,
            "num_classes": data.num_classes,
            "train_images": len(data.train),
            "params": params,
            "wall_s": res["wall_time"],
            "num_processes": accelerator.num_processes,
        }
        return finish_run(run, results, format_summary(results, data.classes), cfg.push_to_hub)


def format_summary(r: dict, classes: list[str]) -> str:
    ious = "  ".join(f"{c.split()[-1]}:{'-' if v is None else f'{v:.2f}'}" for c, v in zip(classes, r["test_iou"]))
    return "\n".join([
        f"\nsegmentation ({r['backbone']} + {r['neck']}, {r['num_classes']} classes, {r['train_images']} training "
        f"images) from {r['init']}",
        f"  test: mIoU {r['miou']:.4f}, pixel acc {r['pixel_acc']:.4f} (epoch {r['selected_epoch']}, chosen on "
        f"val mIoU {r['val_miou']:.4f})",
        f"  test IoU per class: {ious}",
        f"  training time {r['wall_s']:.1f} s"])


if __name__ == "__main__":
    main_entry(main)
