"""The frozen teacher."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visrep.errors import UserError


class FrozenTeacher(nn.Module):
    """A teacher network that cannot change: parameters frozen (``requires_grad_(False)``), always in
    eval mode (``.train()`` is ignored, so BatchNorm statistics and dropout never move), run under
    ``torch.no_grad``. Keep it out of ``accelerator.prepare``: it is never wrapped in DDP or a
    DeepSpeed engine; move it to the device with ``.to(device)``.

    It takes the student's batch as is -- the same augmented images -- and, when teacher and student
    expect different normalisation, maps ``x`` from the student's (mean, std) to the teacher's:
    ``x_t = (x * std_s + mean_s - mean_t) / std_t``; with ``image_size`` set, images of another size
    are resized (bilinear) to it. A teacher of another interface (CLIP's two towers) subclasses this and
    overrides ``forward``, calling :meth:`inputs` on the images.
    """

    def __init__(self, model: nn.Module, student_mean: Optional[Sequence[float]] = None,
                 student_std: Optional[Sequence[float]] = None, teacher_mean: Optional[Sequence[float]] = None,
                 teacher_std: Optional[Sequence[float]] = None, image_size: Optional[int] = None):
        super().__init__()
        self.model = model
        self.image_size = image_size
        self.model.requires_grad_(False)
        self.adapt = None not in (student_mean, student_std, teacher_mean, teacher_std) and (
            tuple(student_mean) != tuple(teacher_mean) or tuple(student_std) != tuple(teacher_std))
        if self.adapt:
            ms, ss = torch.tensor(student_mean), torch.tensor(student_std)
            mt, st = torch.tensor(teacher_mean), torch.tensor(teacher_std)
            self.register_buffer("scale", (ss / st).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("shift", ((ms - mt) / st).view(1, -1, 1, 1), persistent=False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The student's images as the teacher expects them: re-normalised, resized."""
        if self.adapt:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if self.image_size and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # inference mode: no autograd bookkeeping at all (no version counters, no views tracked); the
        # clone is an ordinary tensor the student's loss may save for its backward
        with torch.inference_mode():
            out = self.model(self.inputs(x))
        return out.clone()

    def compile_inference(self, **options: Any) -> "FrozenTeacher":
        """Compile the teacher's inference forward in place (``torch.compile``): one graph, no backward.
        Compile after evaluating the teacher on other batch sizes, so the graph is built for the
        training batch. Returns ``self``."""
        self.model.compile(**options)
        return self


class WeakTeacherError(UserError):
    """The teacher is no better than the student trained without it (every rank sees the same figures)."""

    same_on_every_rank = True


def check_teacher(teacher_val: float, scratch_val: float, teacher_name: str, allow_weaker: bool,
                  say: Callable[[str], None], resume_hint: str = "") -> None:
    """Say (``say``) how the teacher compares with the student trained from scratch (validation
    accuracy), and stop with a :class:`WeakTeacherError` before distilling from a weaker one unless
    ``allow_weaker`` (``kd.allow_weaker_teacher``), which only warns. ``resume_hint``: how to continue."""
    say(f"[distill] validation accuracy: teacher {teacher_val:.4f}, student from scratch {scratch_val:.4f}")
    if teacher_val >= scratch_val:
        return
    msg = (f"the teacher ({teacher_name}) reaches validation accuracy {teacher_val:.4f}, below the student "
           f"trained from scratch ({scratch_val:.4f}): distilling from it would pass on its errors.")
    if allow_weaker:
        say(f"[distill] warning: {msg} Distilling anyway (kd.allow_weaker_teacher).")
        return
    raise WeakTeacherError(f"{msg} Train a stronger teacher (more teacher.train_epochs, another teacher.optim.lr, "
                           f"or teacher.source pretrained/checkpoint), or pass --kd.allow-weaker-teacher True to distil "
                           f"anyway{'; ' + resume_hint if resume_hint else ''}.")
