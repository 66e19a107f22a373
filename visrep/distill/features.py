"""Feature- and relation-based distillation: FitNets hints, attention transfer, DIST and RKD.

The losses are pure tensor functions; :class:`HintRegressor` is the one trainable piece (FitNets), and
:class:`FeatureDistiller` wraps a student of the zoo so that ONE forward returns the student's logits and
every input the losses need -- the student's and the frozen teacher's intermediate feature maps (taken
with forward hooks on the modules each model's ``feature_info`` names; no model is edited) and their
penultimate embeddings (the input of the classifier). The distiller owns the student and the adapters,
so DDP / DeepSpeed wrap them together; the teacher is held outside the module tree (frozen, eval mode,
never wrapped, not in the checkpoints). The weights of a method and the total loss: ``KDConfig``.

Batch statistics and ranks: DIST's intra-class term and RKD's distances and angles relate the samples
of a batch. Under DDP each rank computes them over its own batch (as the official implementations do);
the gradients are then averaged as for any loss -- nothing is gathered across ranks.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visrep.checks import ConfigError
from visrep.zoo.features import _tokens_to_map

FEATURE_METHODS = ("fitnets", "at", "rkd")
"""The methods that need the :class:`FeatureDistiller` (feature maps or embeddings); ``kd`` and ``dist``
use the logits only."""


def _f32(x: torch.Tensor) -> torch.Tensor:
    """fp32 at least: 16-bit inputs (autocast, DeepSpeed) are upcast; float64 stays (the tests' gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


# ----------------------------------------------------------------------------------------------
# FitNets
# ----------------------------------------------------------------------------------------------
def fitnets_hint_loss(student_regressed: torch.Tensor, teacher_hint: torch.Tensor) -> torch.Tensor:
    """FitNets' hint loss, Romero et al., "FitNets: Hints for Thin Deep Nets" (2015, arXiv:1412.6550),
    Eq. (3)::

        L_HT = 1/2 || u_h(x) - r(v_g(x)) ||^2

    with ``u_h`` the teacher's hint layer, ``v_g`` the student's guided layer and ``r`` the regressor
    (:class:`HintRegressor`, applied by the caller). Normalised as ``nn.MSELoss`` (the CRD/RepDistiller and
    torchdistill form): the squared error averaged over batch, channels and positions (the paper's 1/2
    and per-sample sum become a constant the weight ``kd.hint_weight`` absorbs). Computed in fp32; the
    teacher's hint is a constant (detached)."""
    if student_regressed.shape != teacher_hint.shape:
        raise ValueError(f"the regressed student map {tuple(student_regressed.shape)} and the teacher's hint "
                         f"{tuple(teacher_hint.shape)} differ in shape")
    return F.mse_loss(_f32(student_regressed), _f32(teacher_hint.detach()))  # one fused kernel


class HintRegressor(nn.Module):
    """FitNets' regressor ``r``: the student's guided map (``in_chs`` channels) to the teacher's hint
    (``out_chs``) at the same reduction. ``conv1x1_bn``: a 1x1 convolution + BatchNorm (the paper's
    convolutional regressor has a 1x1 kernel when both maps have the same size: k = N_g - N_h + 1);
    ``conv3x3``: a 3x3 convolution, padding 1 (a wider receptive field, as RepDistiller's ``ConvReg``).
    Should the maps still differ in size (odd sizes rounded differently), the output is resized
    (bilinear) to the teacher's."""

    def __init__(self, in_chs: int, out_chs: int, kind: str = "conv1x1_bn"):
        super().__init__()
        if kind == "conv1x1_bn":
            self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)
            self.bn = nn.BatchNorm2d(out_chs)
        elif kind == "conv3x3":
            self.conv = nn.Conv2d(in_chs, out_chs, 3, padding=1)
            self.bn = nn.Identity()
        else:
            raise ValueError(f"unknown regressor '{kind}' (conv1x1_bn or conv3x3)")

    def forward(self, x: torch.Tensor, size: Optional[Sequence[int]] = None) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if size is not None and tuple(y.shape[-2:]) != tuple(size):
            y = F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)
        return y


# ----------------------------------------------------------------------------------------------
# Attention transfer
# ----------------------------------------------------------------------------------------------
def attention_map(x: torch.Tensor, size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Activation-based spatial attention, p = 2, L2-normalised per sample (Zagoruyko & Komodakis,
    "Paying More Attention to Attention", 2017, arXiv:1612.03928, Sec. 3.1 and the official code)::

        Q = vec( mean_c A_c^2 ),   Q / ||Q||_2                                  (N, H*W)

    (the mean over channels, as the official code, equals the paper's sum up to a factor the
    normalisation removes). ``size``: the map is first resized (bilinear) to ``size`` when it differs --
    attention transfer compares maps of the same spatial size, so a student stage of another resolution
    is brought to the teacher's."""
    q = _f32(x).pow(2).mean(1, keepdim=True)
    if size is not None and tuple(q.shape[-2:]) != tuple(size):
        q = F.interpolate(q, size=tuple(size), mode="bilinear", align_corners=False)
    return F.normalize(q.flatten(1), dim=1)


def at_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor],
            beta: float = 1000.0) -> torch.Tensor:
    """Attention-transfer loss over matched stages j (Zagoruyko & Komodakis 2017, arXiv:1612.03928,
    Eq. (2) as the official code computes it)::

        L_AT = beta / 2 * sum_j  mean_{n, i} ( Q_S^j / ||Q_S^j||_2 - Q_T^j / ||Q_T^j||_2 )^2

    the squared difference averaged over the batch and the attention map's positions ("divided by the
    number of elements in the attention map and batch size"), beta = 10^3. A student map of another size
    is resized to the teacher's (:func:`attention_map`). The teacher's maps are constants."""
    if len(student_maps) != len(teacher_maps):
        raise ValueError(f"{len(student_maps)} student maps for {len(teacher_maps)} teacher maps")
    total = 0.0
    for s, t in zip(student_maps, teacher_maps):
        qt = attention_map(t.detach())
        total = total + (attention_map(s, t.shape[-2:]) - qt).pow(2).mean()
    return beta / 2 * total


# ----------------------------------------------------------------------------------------------
# DIST
# ----------------------------------------------------------------------------------------------
def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation (the official code's cosine of the centred rows, + eps)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0, beta: float = 1.0,
              gamma: float = 1.0) -> dict[str, torch.Tensor]:
    """DIST: Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher" (2022,
    arXiv:2205.10536), Eqs. (5)-(7) and the official code (hunto/DIST_KD)::

        Y^s = softmax(z^s / tau),  Y^t = softmax(z^t / tau)                      (B, C)
        L_inter = tau^2 * ( 1 - 1/B sum_i rho_p(Y^s_i,:, Y^t_i,:) )      (rows: per sample, over classes)
        L_intra = tau^2 * ( 1 - 1/C sum_j rho_p(Y^s_:,j, Y^t_:,j) )      (columns: per class, over the batch)
        L_DIST  = beta * L_inter + gamma * L_intra

    rho_p the Pearson correlation (eps = 1e-8 in the denominator, as the code). Computed in fp32; the
    teacher's logits are constants. Returns ``{"loss", "inter", "intra"}`` (the parts detached)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; both models must predict the same classes.")
    ys = (_f32(student_logits) / tau).softmax(dim=1)
    yt = (_f32(teacher_logits.detach()) / tau).softmax(dim=1)
    inter = tau ** 2 * (1 - _pearson(ys, yt).mean())
    intra = tau ** 2 * (1 - _pearson(ys.t(), yt.t()).mean())
    return {"loss": beta * inter + gamma * intra, "inter": inter.detach(), "intra": intra.detach()}


# ----------------------------------------------------------------------------------------------
# RKD
# ----------------------------------------------------------------------------------------------
def _pdist(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``e`` (the official code: clamp then sqrt, zero diagonal)."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance-wise loss, Park, Kim, Lu & Cho, "Relational Knowledge Distillation" (2019,
    arXiv:1904.05068), Eqs. (4)-(5) and the official code (lenscloth/RKD)::

        psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu,   mu = mean of the non-zero pairwise distances
        L_RKD-D = mean over all (i, j) of the B x B matrix  l_delta( psi_D(s_i, s_j), psi_D(t_i, t_j) )

    ``l_delta`` the Huber loss (smooth L1, delta = 1). Embeddings (B, D) of any widths D_s, D_t; fp32;
    the teacher's side is a constant."""
    s = _f32(student).flatten(1)
    with torch.no_grad():
        td = _pdist(_f32(teacher.detach()).flatten(1))
        td = td / td[td > 0].mean()
    sd = _pdist(s)
    sd = sd / sd[sd > 0].mean()
    return F.smooth_l1_loss(sd, td)


def _angles(e: torch.Tensor) -> torch.Tensor:
    d = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # d[i, j] = e_j - e_i, unit length
    return torch.bmm(d, d.transpose(1, 2)).flatten()


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle-wise loss (Park et al. 2019, arXiv:1904.05068, Eqs. (6)-(7), the official code)::

        psi_A(t_i, t_j, t_k) = < (t_i - t_j) / ||t_i - t_j||, (t_k - t_j) / ||t_k - t_j|| >
        L_RKD-A = mean over all B^3 triplets  l_delta( psi_A(s_i, s_j, s_k), psi_A(t_i, t_j, t_k) )

    (the B^3 cosines, degenerate ones with a zero difference included as 0, as the official code).
    fp32; the teacher's side is a constant."""
    with torch.no_grad():
        ta = _angles(_f32(teacher.detach()).flatten(1))
    return F.smooth_l1_loss(_angles(_f32(student).flatten(1)), ta)


# ----------------------------------------------------------------------------------------------
# The wrapper
# ----------------------------------------------------------------------------------------------
def _stage_index(i: int, n: int, key: str, who: str) -> int:
    if not -n <= int(i) < n:
        raise ConfigError(f"{key}: stage index {i} is out of range for the {who}, whose feature_info has {n} "
                          f"stages (0..{n - 1}, or -1..-{n} from the end); pick an index in that range.")
    return int(i) % n


def match_stages(student: nn.Module, teacher: nn.Module, cfg) -> tuple[list[int], list[int]]:
    """The student's and the teacher's ``feature_info`` indices the method ``cfg.method`` matches
    (fitnets: the guided stage and the hint stage; at: the stage pairs; rkd: none, it uses the
    embeddings), or a :class:`ConfigError` naming the key. ``cfg``: a ``KDConfig``; ``teacher``: the model or
    a FrozenTeacher."""
    s_info = list(student.feature_info)
    t_info = list(getattr(teacher, "model", teacher).feature_info)
    if cfg.method == "fitnets":
        si = _stage_index(cfg.hint_stage, len(s_info), "kd.hint_stage", "student")
        if cfg.hint_teacher_stage is None:
            same = [j for j, f in enumerate(t_info) if f["reduction"] == s_info[si]["reduction"]]
            if not same:
                raise ConfigError(
                    f"kd.hint_teacher_stage: the teacher has no stage of reduction {s_info[si]['reduction']} "
                    f"(the student's stage {cfg.hint_stage}); its reductions are "
                    f"{[f['reduction'] for f in t_info]}. Pick another kd.hint_stage or set kd.hint_teacher_stage.")
            return [si], [same[-1]]
        return [si], [_stage_index(cfg.hint_teacher_stage, len(t_info), "kd.hint_teacher_stage", "teacher")]
    if cfg.method == "at":
        t_stages = cfg.at_stages if cfg.at_teacher_stages is None else cfg.at_teacher_stages
        if len(t_stages) != len(cfg.at_stages):
            raise ConfigError(f"kd.at_teacher_stages: {len(t_stages)} teacher stages for {len(cfg.at_stages)} "
                              f"student stages (kd.at_stages); give one teacher stage per student stage.")
        return ([_stage_index(i, len(s_info), "kd.at_stages", "student") for i in cfg.at_stages],
                [_stage_index(i, len(t_info), "kd.at_teacher_stages", "teacher") for i in t_stages])
    return [], []


class _Taps:
    """Forward hooks on named modules (and a pre-hook on the classifier): their latest outputs."""

    def __init__(self, model: nn.Module, names: Sequence[str], classifier: Optional[nn.Module]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise KeyError(f"feature_info names modules that do not exist: {missing}")
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._store(n)) for n in dict.fromkeys(names)]
        if classifier is not None:
            self.handles.append(classifier.register_forward_pre_hook(
                lambda _m, args: self.out.__setitem__("__embedding__", args[0])))

    def _store(self, name: str):
        def fn(_m, _inp, out):
            self.out[name] = out
        return fn

    def take(self) -> dict[str, torch.Tensor]:
        out, self.out = self.out, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class FeatureDistiller(nn.Module):
    """The student of a feature method (``kd.method`` fitnets / at / rkd) with its trainable adapters.

    ``forward(x)`` in training mode runs the student (its own forward, untouched), then the frozen
    ``teacher`` (a :class:`~visrep.distill.FrozenTeacher`, under ``teacher_autocast()``) on the same batch,
    and returns a dict: ``logits``, ``teacher_logits`` and, per method, ``student_features`` /
    ``teacher_features`` (lists of NCHW maps: for fitnets the regressed guided map and the hint; for at the
    matched stages) or ``student_embedding`` / ``teacher_embedding`` (the classifiers' inputs, for rkd).
    In eval mode it returns the student's logits only, so any classifier evaluation applies.

    The feature maps are those of ``feature_info`` (the modules it names, by forward hooks: the same maps
    as :func:`visrep.zoo.features.collect_features`); the stage indices come from ``cfg`` (a ``KDConfig``). The teacher is
    not a submodule: ``state_dict`` holds ``student.*`` and ``regressor.*`` only, and a plain student state
    dict (an export, ``RUN_DIR/models/STAGE``) loads into the student (the adapters keep their values).
    Export the student alone: its keys under :attr:`EXPORT_PREFIX`.
    """

    EXPORT_PREFIX = "student."

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg,
                 teacher_autocast: Callable[[], ContextManager] = contextlib.nullcontext):
        super().__init__()
        if cfg.method not in FEATURE_METHODS:
            raise ConfigError(f"kd.method: FeatureDistiller serves the feature methods {FEATURE_METHODS}, not "
                              f"'{cfg.method}' (kd and dist need the logits only: use DistillationLoss directly).")
        self.student = student
        self._teacher = (teacher,)  # a tuple: not a submodule (not wrapped, not saved, not moved)
        self.method = cfg.method
        self.teacher_autocast = teacher_autocast
        t_model = getattr(teacher, "model", teacher)
        s_info, t_info = list(student.feature_info), list(t_model.feature_info)
        self.s_idx, self.t_idx = match_stages(student, t_model, cfg)
        self.regressor = None
        if cfg.method == "fitnets":
            self.regressor = HintRegressor(s_info[self.s_idx[0]]["num_chs"], t_info[self.t_idx[0]]["num_chs"],
                                           cfg.hint_regressor)
        self._s_info = [s_info[i] for i in self.s_idx]
        self._t_info = [t_info[i] for i in self.t_idx]
        want_emb = cfg.method == "rkd"
        self._s_taps = _Taps(student, [f["module"] for f in self._s_info],
                             student.get_classifier() if want_emb else None)
        self._t_taps = _Taps(t_model, [f["module"] for f in self._t_info],
                             t_model.get_classifier() if want_emb else None)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    @staticmethod
    def _maps(out: dict, infos: list[dict], clone: bool = False) -> list[torch.Tensor]:
        maps = [_tokens_to_map(out[f["module"]], f, None) for f in infos]
        return [m.clone() for m in maps] if clone else maps

    def forward(self, x: torch.Tensor):
        if not self.training:
            logits = self.student(x)
            self._s_taps.take()  # drop the hooked maps
            return logits
        logits = self.student(x)
        s = self._s_taps.take()
        with self.teacher_autocast():
            teacher_logits = self.teacher(x)  # frozen: inference mode inside, the very batch the student sees
        t = self._t_taps.take()
        out = {"logits": logits, "teacher_logits": teacher_logits}
        if self.method == "rkd":
            # the teacher's tensors were made in inference mode: clone them into ordinary tensors
            out["student_embedding"] = s["__embedding__"]
            out["teacher_embedding"] = t["__embedding__"].clone()
            return out
        s_maps, t_maps = self._maps(s, self._s_info), self._maps(t, self._t_info, clone=True)
        if self.regressor is not None:
            s_maps = [self.regressor(s_maps[0], t_maps[0].shape[-2:])]
        out["student_features"], out["teacher_features"] = s_maps, t_maps
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if state_dict and not any(k.startswith(self.EXPORT_PREFIX) for k in state_dict):
            # a plain student (an export): into the student; the adapters keep their values
            return self.student.load_state_dict(state_dict, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def remove_hooks(self) -> None:
        """Take the forward hooks off the student and the teacher (the distiller is done with them)."""
        self._s_taps.remove()
        self._t_taps.remove()
