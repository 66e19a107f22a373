"""Soft-target knowledge distillation: compress a big teacher into a small, fast student.

    accelerate launch recipes/distill.py                          # embedded digits, CPU-sized
    accelerate launch recipes/distill.py --config recipes/configs/digits.yaml --kd.temperature 2
    accelerate launch recipes/distill.py --teacher.source checkpoint --teacher.checkpoint RUN/models/teacher
    accelerate launch recipes/distill.py --resume latest --output-dir runs/distill

Three stages, each checkpointed and resumable:
  1. teacher   -- trained here (teacher.source=train), or loaded (a checkpoint of this project / a
                  pretrained zoo model), then frozen;
  2. scratch   -- the student trained with cross-entropy only;
  3. kd        -- the same student, same seed, same budget, trained on the teacher's soft targets
                  (Hinton et al. 2015, arXiv:1503.02531), loss as defined in visrep.distill.KDConfig;
                  --kd.method fitnets | at | dist | rkd adds (or, for dist, puts instead of the KL) a
                  feature- or relation-based term: FitNets hints, attention transfer, DIST, RKD.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

import torch
from accelerate.utils import set_seed

from visrep.checks import ConfigError, check
from visrep.data import DataConfig, build_classification_data
from visrep.distill import (FEATURE_METHODS, DistillationLoss, FeatureDistiller, FrozenTeacher, KDConfig, check_teacher,
                            match_stages)
from visrep.engine import (BackboneConfig, OptimConfig, RecipeConfig, Run, ScheduleConfig, build_optimizer,
                           count_parameters, evaluate_classifier)
from visrep.engine.export import backbone_config, load_model, write_export
from visrep.engine.supervised import SupervisedConfig, SupervisedObjective
from visrep.errors import main_entry
from visrep.launch import finish_run
from visrep.zoo import create_backbone, get_data_config

PRESETS = Path(__file__).resolve().parent / "configs"


@dataclasses.dataclass
class TeacherConfig:
    source: Literal["train", "checkpoint", "pretrained"] = "train"
    """train: trained by this recipe first; checkpoint: an exported model of this project
    (RUN_DIR/models/STAGE); pretrained: model.name with pretrained weights (timm / torchvision)."""
    model: BackboneConfig = dataclasses.field(default_factory=lambda: BackboneConfig(name="resnet20"))
    checkpoint: Optional[str] = None
    train_epochs: int = 30
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)

    def validate(self, prefix: str) -> None:
        check(self.source != "train" or self.train_epochs > 0, f"{prefix}train_epochs", self.train_epochs,
              "an integer > 0 when teacher.source is 'train'")
        check(self.source != "checkpoint" or bool(self.checkpoint), f"{prefix}checkpoint", self.checkpoint,
              "the directory of an exported model (RUN_DIR/models/STAGE) when teacher.source is 'checkpoint'")


@dataclasses.dataclass
class DistillRecipeConfig(RecipeConfig):
    output_dir: str = "runs/distill"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    student: BackboneConfig = dataclasses.field(default_factory=lambda: BackboneConfig(name="resnet20", kwargs={"width": 0.5}))
    kd: KDConfig = dataclasses.field(default_factory=KDConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """Student optimizer (both student runs)."""
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    """Student budget (both student runs); the teacher uses teacher.train_epochs with the same shape."""
    supervised: SupervisedConfig = dataclasses.field(default_factory=SupervisedConfig)
    """Label smoothing, MixUp / CutMix and auxiliary classifiers for every stage's label term (off by default)."""


def build(bb: BackboneConfig, num_classes: int) -> torch.nn.Module:
    return create_backbone(bb.name, pretrained=bb.pretrained, num_classes=num_classes, checkpoint=bb.checkpoint,
                           small_input=bb.small_input, **bb.kwargs,
                           grad_checkpointing=bb.grad_checkpointing)


def train_classifier(run: Run, cfg: DistillRecipeConfig, data, name: str, model: torch.nn.Module,
                     backbone: BackboneConfig, optim_cfg: OptimConfig, epochs: int,
                     teacher: Optional[FrozenTeacher] = None) -> tuple[torch.nn.Module, dict]:
    """One stage: cross-entropy (teacher is None) or distillation from ``teacher``."""
    accelerator = run.accelerator
    data_config = get_data_config(model)
    export_prefix = None  # the whole model is the student
    if teacher is not None and cfg.kd.method in FEATURE_METHODS:
        # the student with its trainable adapters, and hooks on its stages and the teacher's: one forward
        # gives the logits and the losses' inputs; the teacher stays outside (frozen, never wrapped)
        model = FeatureDistiller(model, teacher, cfg.kd, teacher_autocast=run.autocast)
        export_prefix = FeatureDistiller.EXPORT_PREFIX  # export the student alone
    global_batch = cfg.run.batch_size * accelerator.num_processes * cfg.run.grad_accum
    optimizer = build_optimizer(model, optim_cfg, global_batch)  # lr scaled with the batch (optim.lr_scaling)
    model, optimizer, train_loader, val_loader, test_loader = run.prepare(
        model, optimizer, data.train_loader, data.val_loader, data.test_loader, grad_clip=optim_cfg.grad_clip)
    stage = run.stage(name, model=model, optimizer=optimizer, train_loader=train_loader, epochs=epochs,
                      schedule=cfg.schedule, grad_clip=optim_cfg.grad_clip, epoch_setters=data.epoch_setters,
                      export=lambda d: write_export(accelerator, model, d, "backbone",
                                                    backbone_config(backbone, data.num_classes, data_config),
                                                    prefix=export_prefix))
    objective = SupervisedObjective(cfg.supervised, data.num_classes, cfg.seed, accelerator.process_index)
    kd_loss = DistillationLoss(cfg.kd, ce=objective.ce)
    if teacher is not None and stage.compiled:  # the teacher's forward on the training batch, compiled too
        teacher.compile_inference()

    for epoch in stage.epochs():
        model.train()
        for x, y in stage.batches():
            with accelerator.accumulate(model):
                x, target = objective.mix(x, y, stage)  # MixUp / CutMix when configured: teacher and student alike
                labels = None if cfg.kd.label_free else target
                if teacher is None:
                    losses = objective(model, model(x), target)  # cross-entropy (+ auxiliary classifiers)
                else:
                    if export_prefix is not None:  # one forward: both models' logits and features / embeddings
                        out = model(x)
                        logits, teacher_logits = out.pop("logits"), out.pop("teacher_logits")
                    else:
                        logits, out = model(x), {}
                        with run.autocast():  # the fp32 teacher, autocast also under DeepSpeed
                            teacher_logits = teacher(x)  # the very batch the student sees
                    losses = kd_loss(logits, teacher_logits, labels, **out)
                    # auxiliary classifiers (GoogLeNet): the labels, or without labels the teacher's prediction
                    aux_target = labels if labels is not None else teacher_logits.detach().argmax(-1)
                    losses = objective.with_aux(model, losses, aux_target)
                accelerator.backward(losses["loss"])
            stage.optimizer_step(**losses)
        val = evaluate_classifier(model, val_loader, accelerator)
        stage.epoch_done(val_acc=val["top1"], val_loss=val["loss"])

    val = evaluate_classifier(model, val_loader, accelerator)
    test = evaluate_classifier(model, test_loader, accelerator)
    results = stage.finish({"val_acc": val["top1"], "test_acc": test["top1"], "test_top5": test["top5"]})
    model = accelerator.unwrap_model(model)
    if isinstance(model, FeatureDistiller):
        model.remove_hooks()
        model = model.student
    return model, results


def main(argv=None) -> dict:
    with Run.from_cli(DistillRecipeConfig, "distill", argv, PRESETS / "digits.yaml", __doc__) as run:
        cfg, accelerator = run.cfg, run.accelerator
        probe = build(cfg.student, 0)
        student_dc = get_data_config(probe)
        data = build_classification_data(cfg.data, student_dc, cfg.seed, cfg.run.batch_size,
                                         cfg.run.eval_batch_size, cfg.run.num_workers)
        t = cfg.teacher
        if cfg.kd.method in FEATURE_METHODS and t.source == "train":  # a bad stage index stops now, not after training
            match_stages(probe, build(t.model, 0), cfg.kd)

        # ---- 1. teacher ------------------------------------------------------------------------
        set_seed(cfg.seed)
        if t.source == "train":
            _, teacher_res = train_classifier(run, cfg, data, "teacher", build(t.model, data.num_classes),
                                              t.model, t.optim, t.train_epochs)
            # reload the export: a plain module, whatever wrapped or sharded it during training
            teacher_net, _ = load_model(run.run_dir / "models" / "teacher")
        else:
            if t.source == "checkpoint":
                teacher_net, _ = load_model(t.checkpoint)
            else:
                teacher_net = create_backbone(t.model.name, pretrained=True, num_classes=data.num_classes,
                                              small_input=t.model.small_input, **t.model.kwargs)
            teacher_res = {"wall_time": 0.0}
        if getattr(teacher_net, "num_classes", data.num_classes) != data.num_classes:
            raise ConfigError(f"the teacher predicts {teacher_net.num_classes} classes but the data has "
                             f"{data.num_classes}; distillation needs the same label space.")
        if cfg.kd.method in FEATURE_METHODS:
            match_stages(probe, teacher_net, cfg.kd)
        del probe
        teacher_dc = get_data_config(teacher_net)
        teacher = FrozenTeacher(teacher_net, student_dc["mean"], student_dc["std"], teacher_dc["mean"],
                                teacher_dc["std"]).to(accelerator.device)
        # The teacher is scored on the student's (normalised) batches, as the student sees them.
        val_loader, test_loader = accelerator.prepare(data.val_loader, data.test_loader)
        teacher_val = evaluate_classifier(teacher, val_loader, accelerator)
        teacher_test = evaluate_classifier(teacher, test_loader, accelerator)
        accelerator.free_memory()

        # ---- 2. student from scratch; the teacher must beat it ----------------------------------------
        set_seed(cfg.seed)  # the same initial weights, data order and augmentation for both students
        _, scratch = train_classifier(run, cfg, data, "scratch", build(cfg.student, data.num_classes), cfg.student,
                                      cfg.optim, cfg.schedule.epochs)
        check_teacher(teacher_val["top1"], scratch["val_acc"], t.model.name, cfg.kd.allow_weaker_teacher, run.print,
                      f"--resume latest --output-dir {run.run_dir} keeps the stages already trained")

        # ---- 3. the same student with KD ------------------------------------------------------------
        set_seed(cfg.seed)
        kd_net, kd = train_classifier(run, cfg, data, "kd", build(cfg.student, data.num_classes), cfg.student,
                                      cfg.optim, cfg.schedule.epochs, teacher=teacher)

        # ---- results -----------------------------------------------------------------------------
        results = {
            "teacher_acc": teacher_test["top1"],
            "teacher_val_acc": teacher_val["top1"],
            "student_scratch_acc": scratch["test_acc"],
            "student_kd_acc": kd["test_acc"],
            "kd_gain": kd["test_acc"] - scratch["test_acc"],
            "teacher_params": count_parameters(teacher_net),
            "student_params": count_parameters(kd_net),
            "teacher_top5": teacher_test["top5"],
            "student_scratch_val_acc": scratch["val_acc"],
            "student_kd_val_acc": kd["val_acc"],
            "teacher_wall_s": teacher_res["wall_time"],
            "student_scratch_wall_s": scratch["wall_time"],
            "student_kd_wall_s": kd["wall_time"],
            "num_processes": accelerator.num_processes,
            "kd_method": cfg.kd.method,
        }
        return finish_run(run, results, format_table(results, cfg), cfg.push_to_hub)


def format_table(r: dict, cfg: DistillRecipeConfig) -> str:
    """The results table: the same for the same seed on the same machine (training times, which are
    not, follow on their own line)."""
    rows = [("teacher", cfg.teacher.model.name, r["teacher_acc"], r["teacher_params"]),
            ("student (scratch)", cfg.student.name, r["student_scratch_acc"], r["student_params"]),
            ("student (KD)", cfg.student.name, r["student_kd_acc"], r["student_params"])]
    lines = [f"\n{'model':<20}{'architecture':<20}{'test acc':>10}{'params':>12}", "-" * 62]
    lines += [f"{a:<20}{b:<20}{c:>10.4f}{d:>12,}" for a, b, c, d in rows]
    k = cfg.kd
    how = f"T={k.temperature}, kd_weight={k.kd_weight}" if k.method == "kd" else (
        f"method=dist, tau={k.dist_tau}, beta={k.dist_beta}, gamma={k.dist_gamma}" if k.method == "dist" else
        f"method={k.method}, T={k.temperature}, kd_weight={k.kd_weight}")
    lines.append(f"KD gain over scratch: {r['kd_gain']:+.4f}  ({how})")
    lines.append(f"training time: teacher {r['teacher_wall_s']:.1f} s, student (scratch) "
                 f"{r['student_scratch_wall_s']:.1f} s, student (KD) {r['student_kd_wall_s']:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main_entry(main)
