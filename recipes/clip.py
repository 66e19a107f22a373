"""CLIP: contrastive image-text training, then zero-shot classification and retrieval.

    accelerate launch recipes/clip.py                                  # embedded digits, CPU-sized
    accelerate launch recipes/clip.py --clip.loss sigmoid --model.init-logit-scale 2.3026 --model.init-logit-bias -10
    accelerate launch recipes/clip.py --run.grad-accum 4               # 4 micro-batches, all negatives kept
    accelerate launch recipes/clip.py --teacher.source checkpoint --teacher.checkpoint RUN/models/clip
    accelerate launch recipes/clip.py --resume latest --output-dir runs/clip
    accelerate launch recipes/clip.py --model.text.source hf --model.text.name distilbert-base-uncased \
        --model.text.pretrained yes                                    # a transformers text tower

One stage, checkpointed and resumable:
  per step   embed images and captions, L2-normalise, loss of this rank's rows against the features of
             all ranks (visrep.clip.clip_loss: symmetric InfoNCE, or SigLIP's sigmoid loss), optionally
             plus distillation from a frozen CLIP teacher; with run.grad_accum > 1 the step caches the
             features of every micro-batch and recomputes them (GradCache), so no negative is lost;
             optimizer step; clamp the log logit scale to ln(100).
  per epoch  zero-shot accuracy and retrieval recall on the validation split.
  at the end zero-shot accuracy (held-out prompt templates) and retrieval recall@1/5/10 on the test split.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

from visrep.checks import check
from visrep.clip import (ClipModelConfig, ContrastiveLoss, FrozenClipTeacher, build_clip_model, clamp_logit_scale,
                         contrastive_step, create_open_clip, evaluate_clip, export_clip, get_tokenizer,
                         image_data_config, load_clip)
from visrep.data.pairs import PairsConfig, build_pair_data
from visrep.distill import KDConfig
from visrep.engine import OptimConfig, RecipeConfig, Run, ScheduleConfig, build_optimizer, count_parameters
from visrep.errors import main_entry
from visrep.launch import finish_run

PRESETS = Path(__file__).resolve().parent / "configs"


@dataclasses.dataclass
class ClipMethodConfig:
    loss: Literal["infonce", "sigmoid"] = "infonce"
    """infonce: CLIP's symmetric softmax loss; sigmoid: SigLIP (needs model.init_logit_bias)."""
    gather: bool = True
    """Negatives from all ranks (autograd-aware all-gather); false: each rank's own batch only."""


@dataclasses.dataclass
class ClipTeacherConfig(KDConfig):
    """CLIP-to-CLIP distillation: loss = (1 - kd_weight) * contrastive + kd_weight * KD(student, teacher),
    the KD term soft targets over the batch at ``temperature`` (``visrep.distill.KDConfig``: weights and
    temperature are defined there once; the targets are always soft, and labels are never used)."""

    source: Literal["none", "checkpoint", "open_clip"] = "none"
    checkpoint: Optional[str] = None
    """An exported CLIP model of this recipe (RUN_DIR/models/clip)."""
    name: Optional[str] = None
    """open_clip model config (source=open_clip)."""
    pretrained: Optional[str] = None
    """open_clip pretrained tag or local checkpoint file."""
    image_size: Optional[int] = None
    """Input size of an open_clip teacher (default: its config's); the student's images are resized."""
    kd_weight: float = 0.5
    temperature: float = 1.0

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check(self.targets == "soft", f"{prefix}targets", self.targets, "'soft' (CLIP distils similarity distributions)")
        check(self.source != "checkpoint" or bool(self.checkpoint), f"{prefix}checkpoint", self.checkpoint,
              "an exported CLIP model directory when teacher.source is 'checkpoint'")
        check(self.source != "open_clip" or bool(self.name), f"{prefix}name", self.name,
              "an open_clip model config name when teacher.source is 'open_clip'")


@dataclasses.dataclass
class ClipRecipeConfig(RecipeConfig):
    output_dir: str = "runs/clip"
    data: PairsConfig = dataclasses.field(default_factory=PairsConfig)
    model: ClipModelConfig = dataclasses.field(default_factory=ClipModelConfig)
    clip: ClipMethodConfig = dataclasses.field(default_factory=ClipMethodConfig)
    teacher: ClipTeacherConfig = dataclasses.field(default_factory=ClipTeacherConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1,
                                                                               betas=(0.9, 0.98)))
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    """run.batch_size: micro-batch per device; run.grad_accum micro-batches form one step's batch."""

    def validate(self, prefix: str) -> None:
        check(self.clip.loss != "sigmoid" or self.model.init_logit_bias is not None, "model.init_logit_bias",
              self.model.init_logit_bias, "a number (SigLIP: -10) when clip.loss is 'sigmoid'")


def build_teacher(cfg: ClipRecipeConfig, student_dc: dict, device) -> Optional[FrozenClipTeacher]:
    t = cfg.teacher
    if t.source == "none" or t.kd_weight == 0:
        return None
    if t.source == "checkpoint":
        net, meta = load_clip(t.checkpoint)
        teacher_dc, size = meta["data_config"], meta.get("image_size")
    else:
        net = create_open_clip(t.name, t.pretrained, t.image_size)
        pc = getattr(net.visual, "preprocess_cfg", {}) or {}
        teacher_dc = {"mean": pc.get("mean"), "std": pc.get("std")}
        size = t.image_size or int(getattr(net.visual, "image_size", (224,))[0])
    return FrozenClipTeacher(net, student_dc, teacher_dc, size).to(device)


def main(argv=None) -> dict:
    # run.grad_accum micro-batches are accumulated inside one step (GradCache, contrastive_step)
    with Run.from_cli(ClipRecipeConfig, "clip", argv, PRESETS / "clip_digits.yaml", __doc__,
                      accumulates_in_step=True) as run:
        cfg, accelerator, chunks = run.cfg, run.accelerator, run.cfg.run.grad_accum

        # ---- model, tokenizer, data -----------------------------------------------------------------
        model = build_clip_model(cfg.model, image_size=cfg.data.image_size, in_chans=cfg.data.channels)
        tokenizer = get_tokenizer(model)
        data_config = image_data_config(model)
        data = build_pair_data(cfg.data, data_config, tokenizer, cfg.seed, cfg.run.batch_size * chunks,
                               cfg.run.eval_batch_size, cfg.run.num_workers)
        teacher = build_teacher(cfg, data_config, accelerator.device)
        optimizer = build_optimizer(model, cfg.optim)  # logit scale / bias: no weight decay (model.no_weight_decay)
        model, optimizer, train_loader, val_loader, test_loader = run.prepare(
            model, optimizer, data.train_loader, data.val_loader, data.test_loader, grad_clip=cfg.optim.grad_clip)
        export_meta = {"image_size": cfg.data.image_size, "in_chans": cfg.data.channels,
                       "classnames": data.classnames, "templates": data.templates}
        stage = run.stage("clip", model=model, optimizer=optimizer, train_loader=train_loader,
                          epochs=cfg.schedule.epochs, schedule=cfg.schedule, grad_clip=cfg.optim.grad_clip,
                          epoch_setters=data.epoch_setters,
                          export=lambda d: export_clip(accelerator, model, d, cfg.model, data_config, export_meta))
        loss_fn = ContrastiveLoss(cfg.clip.loss, cfg.teacher.kd_weight if teacher else 0.0, cfg.teacher.temperature,
                                  cfg.clip.gather)
        evaluate = lambda loader, templates=data.templates: evaluate_clip(  # noqa: E731
            model, loader, accelerator, tokenizer, data.classnames, templates)

        # ---- training ---------------------------------------------------------------------------------
        for epoch in stage.epochs():
            model.train()
            for images, tokens, _, _ in stage.batches():
                stage.record_samples(images, data_config, captions=tokens, decode=tokenizer.decode)  # for the report
                losses = contrastive_step(accelerator, model, loss_fn, images, tokens, chunks, teacher)
                if stage.optimizer_step(losses.pop("loss"), **losses):  # logged with the logit scale this step used
                    clamp_logit_scale(accelerator.unwrap_model(model), cfg.model.max_logit_scale)
            val = evaluate(val_loader)
            stage.epoch_done(**{f"val_{k}": v for k, v in val.items() if k != "count"})

        # ---- evaluation -------------------------------------------------------------------------------
        test = evaluate(test_loader)
        extra = {}
        if data.train_templates and data.classnames:
            extra["zero_shot_acc_train_templates"] = evaluate(test_loader, data.train_templates)["zero_shot_acc"]
        net = accelerator.unwrap_model(model)
        final_scale = float(net.logit_scale_value().reshape(-1)[0])
        stage_res = stage.finish({k: v for k, v in test.items()})
        results = {k: test[k] for k in ("zero_shot_acc", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5") if k in test}
        results.update({k: test[k] for k in ("zero_shot_top5", "i2t_r10", "t2i_r10") if k in test})
        results.update(extra)
        results.update({
            "chance_acc": 1.0 / len(data.classnames) if data.classnames else None,
            "logit_scale": final_scale,
            "params": count_parameters(net),
            "image_tower_params": count_parameters(net.image_tower),
            "text_tower_params": count_parameters(net.text_tower),
            "test_pairs": test["count"],
            "global_batch": cfg.run.batch_size * chunks * accelerator.num_processes,
            "train_wall_s": stage_res["wall_time"],
            "num_processes": accelerator.num_processes,
        })
        return finish_run(run, results, format_table(results, cfg), cfg.push_to_hub)


def format_table(r: dict, cfg: ClipRecipeConfig) -> str:
    lines = [f"\nCLIP ({cfg.clip.loss}) on {cfg.data.source}: image tower {cfg.model.image.name}, "
             f"text tower {cfg.model.text.source}, {r['params']:,} params, global batch {r['global_batch']}, "
             f"{r['train_wall_s']:.1f}s train, {r['num_processes']} process(es)"]
    if "zero_shot_acc" in r:
        lines.append(f"zero-shot accuracy (held-out templates): {r['zero_shot_acc']:.4f}   top-5 "
                     f"{r['zero_shot_top5']:.4f}   chance {r['chance_acc']:.4f}")
    lines.append(f"{'retrieval':<12}{'R@1':>8}{'R@5':>8}{'R@10':>8}   ({r['test_pairs']} test pairs)")
    for d in ("i2t", "t2i"):
        lines.append(f"{d:<12}{r[d + '_r1']:>8.4f}{r[d + '_r5']:>8.4f}{r[d + '_r10']:>8.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main_entry(main)
