"""A training run: accelerator, run directory, metrics, checkpoints, resume -- the plumbing every
recipe shares, so that the recipe itself shows only the algorithm.

Run directory layout::

    RUN_DIR/config.yaml            resolved config
    RUN_DIR/metrics.jsonl          one JSON object per logged step / epoch (main process)
    RUN_DIR/state.json             stages finished so far, their results and wall time
    RUN_DIR/checkpoints/STAGE/step_XXXXXXXX/   Accelerate state + trainer_state.json + config.yaml
    RUN_DIR/models/STAGE/          exported weights (model.safetensors + config.json) of a finished stage
    RUN_DIR/results.json           final figures
    RUN_DIR/samples/               the first training batch as the model received it (Stage.record_samples)

A recipe may have several stages (distillation: teacher, student from scratch, student with KD). Each
stage checkpoints on its own; a finished stage is skipped on resume and its exported weights are
loaded back, so ``--resume latest`` continues exactly where the run stopped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import (DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs,
                              ProjectConfiguration, broadcast_object_list, set_seed)

from visrep.engine.checkpoint import (CHECKPOINT_PREFIX, list_checkpoints, newest_intact, verify,
                                     write_dir_atomically)
from visrep.engine.config import RunConfig, ScheduleConfig, diff_configs, parse_config, save_yaml, to_dict
from visrep.engine.distributed import configure_engine, deepspeed_on_cpu, engine_precision
from visrep.engine.export import load_full_state_dict
from visrep.engine.fast import compile_decision, compile_training_forward, cuda_fast_math, to_channels_last
from visrep.engine.io import atomic_write_json, atomic_write_text, is_writer, replace_dir
from visrep.engine.optim import StepSchedule
from visrep.engine.precision import autocast, cast_inputs_to_engine, fp32_norm_layers, resolve_mixed_precision
from visrep.engine.preempt import StopRequest
from visrep.errors import CheckpointError, Preempted, UserError

# Keys that may differ between the run that was interrupted and the one that resumes it.
RESUME_FREE_KEYS = ("resume", "run.stop_after_steps", "run.progress", "run.trackers", "run.report", "config",
                    "push_to_hub")


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; the run stops and the last good checkpoint stays as it was."""

    same_on_every_rank = True  # the check is all-reduced: every rank raises it at the same step


class StopRun(Exception):
    """Raised inside a run to stop it cleanly (``run.stop_after_steps``)."""


# ----------------------------------------------------------------------------------------------
# Metrics: a JSONL file, as an Accelerate tracker, so ``accelerator.log`` feeds it and any other
# tracker (tensorboard, wandb, ...) alike.
# ----------------------------------------------------------------------------------------------
class JSONLTracker(GeneralTracker):
    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)
        self._file = None

    @property
    def tracker(self):
        return self._file

    def start(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)

    def store_init_configuration(self, values: dict):
        pass  # the resolved config lives in config.yaml

    def log(self, values: dict, step: Optional[int] = None, **kwargs):
        if self._file is None:
            self.start()
        record = {"step": step, "time": round(time.time(), 3)}
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            record[k] = v
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: name the file
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def finish(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def reopen(self):
        """After the file was replaced on disk (``truncate_metrics``), append to the new one."""
        self.finish()
        self.start()


def read_metrics(path: Path) -> list[tuple[str, dict]]:
    """The (line, record) pairs of a ``metrics.jsonl``; a line cut short by an interruption is skipped."""
    pairs = []
    for line in (path.read_text().splitlines() if path.exists() else ()):
        try:
            pairs.append((line, json.loads(line)))
        except json.JSONDecodeError:
            continue
    return pairs


def truncate_metrics(path: Path, stage: str, after_step: int) -> None:
    """On resume, drop records of ``stage`` logged after the checkpoint being resumed, so the file
    reads as one uninterrupted run."""
    if not path.exists():
        return
    keep = [line for line, rec in read_metrics(path)
            if not (rec.get("stage") == stage and (rec.get("stage_step") or 0) > after_step)]
    atomic_write_text(path, "".join(l + "\n" for l in keep))


def set_deterministic() -> None:
    """Deterministic kernels for ``run.deterministic``: an op without a deterministic implementation
    raises instead of silently differing between runs."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def build_accelerator(run_cfg: RunConfig, run_dir: Path, **kwargs) -> Accelerator:
    trackers: list[Any] = [JSONLTracker(run_dir / "metrics.jsonl")]
    for name in run_cfg.trackers:
        if name != "jsonl":
            trackers.append(name)
    # Every backend gets the run's collective timeout (NCCL's default of 10 minutes is shorter than a
    # Hub upload or a long evaluation on rank 0 while the others wait at a barrier). On a CPU host
    # under DeepSpeed, Accelerate finds no backend and records 1 process while DeepSpeed starts a
    # group of WORLD_SIZE ranks; naming gloo makes both agree on the world size and ranks.
    handlers = list(kwargs.pop("kwargs_handlers", []))
    handlers.append(InitProcessGroupKwargs(backend="gloo" if deepspeed_on_cpu() else None,
                                           timeout=timedelta(seconds=run_cfg.dist_timeout_s)))
    kwargs["kwargs_handlers"] = handlers
    return Accelerator(
        mixed_precision=resolve_mixed_precision(run_cfg.mixed_precision),
        # host-to-device copies from pinned loader memory overlap the step (visrep.data.loader_options)
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
        gradient_accumulation_steps=run_cfg.grad_accum,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs"),
                                            save_on_each_node=run_cfg.save_on_each_node),
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------
# The first training batch, for the report
# ----------------------------------------------------------------------------------------------
SAMPLES_DIR = "samples"
SAMPLES_VIEWS, SAMPLES_META = "train_views.pt", "train_views.json"
MAX_SAMPLES = 16


class SamplesWarning(UserWarning):
    """The first training batch could not be saved for the report; the run goes on."""


def view_names(views: list[torch.Tensor], global_views: Optional[int] = None) -> list[str]:
    """"view k" for the first ``global_views`` views, "local k" for the rest (multi-crop's local crops); with
    ``global_views`` None, "view k" for those at the first view's size (local crops as large as the global
    views then count as views)."""
    size, counts, names = views[0].shape[-2:], {"view": 0, "local": 0}, []
    for i, v in enumerate(views):
        is_global = v.shape[-2:] == size if global_views is None else i < global_views
        kind = "view" if is_global else "local"
        counts[kind] += 1
        names.append(f"{kind} {counts[kind]}")
    return names


def save_samples(run_dir: str | os.PathLike, views, mean, std, captions: Optional[list[str]] = None,
                 names: Optional[list[str]] = None, stage: str = "", n: int = MAX_SAMPLES,
                 global_views: Optional[int] = None) -> Path:
    """``RUN_DIR/samples/``: the first ``n`` samples of every view (``views``: a tensor or a list, each
    (N, C, H, W), normalised with ``mean`` / ``std``) copied to the CPU as they are (dtype included), in
    ``train_views.pt``; their names (``names``, else :func:`view_names` with ``global_views``), captions and
    normalisation in ``train_views.json``. The directory is written whole, then renamed into place
    (:func:`visrep.engine.io.replace_dir`)."""
    views = [views] if isinstance(views, torch.Tensor) else list(views)
    tensors = [v.detach()[:n].to("cpu", copy=True) for v in views]  # a copy: a slice would save the whole batch
    meta = {"stage": stage, "names": list(names) if names else view_names(tensors, global_views),
            "captions": [str(c) for c in captions[:n]] if captions is not None else None,
            "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    if len(meta["names"]) != len(tensors):
        raise ValueError(f"{len(meta['names'])} names for {len(tensors)} views")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{SAMPLES_DIR}-"))
    try:
        torch.save(tensors, tmp / SAMPLES_VIEWS)
        atomic_write_json(tmp / SAMPLES_META, meta)
        replace_dir(tmp, run_dir / SAMPLES_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir / SAMPLES_DIR


def read_samples(run_dir: str | os.PathLike) -> Optional[tuple[list[torch.Tensor], dict]]:
    """What :func:`save_samples` wrote: (views, meta), or None when the run saved none."""
    d = Path(run_dir) / SAMPLES_DIR
    if not (d / SAMPLES_META).is_file():
        return None
    return torch.load(d / SAMPLES_VIEWS, weights_only=True), json.loads((d / SAMPLES_META).read_text())


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
class Run:
    """Owns the accelerator and the run directory. Use as a context manager around the recipe body.

    ``output_dir``, ``seed``, ``run_cfg`` and ``resume`` default to the recipe config's own (a
    :class:`visrep.engine.config.RecipeConfig`). ``accumulates_in_step``: the recipe accumulates
    micro-batches inside one step itself (CLIP's cached-feature steps), so the accelerator sees one
    batch per optimizer step whatever ``run.grad_accum`` says."""

    def __init__(self, cfg: Any, recipe: str, output_dir: Optional[str] = None, seed: Optional[int] = None,
                 run_cfg: Optional[RunConfig] = None, resume: Optional[str] = None, accumulates_in_step: bool = False):
        output_dir = cfg.output_dir if output_dir is None else output_dir
        seed = cfg.seed if seed is None else seed
        run_cfg = cfg.run if run_cfg is None else run_cfg
        resume = getattr(cfg, "resume", None) if resume is None else resume
        self.cfg = cfg
        self.recipe = recipe
        self.run_cfg = run_cfg
        self.resume_ckpt: Optional[Path] = None
        self.run_dir = Path(output_dir)
        if resume not in (None, "", "latest"):
            self.resume_ckpt = Path(resume)
            if not self.resume_ckpt.is_dir() or not self.resume_ckpt.name.startswith(CHECKPOINT_PREFIX):
                raise CheckpointError(
                    f"--resume {resume}: '{self.resume_ckpt}' is not a checkpoint directory. Pass a directory "
                    f"RUN_DIR/checkpoints/STAGE/{CHECKPOINT_PREFIX}N or 'latest'.")
            self.run_dir = self.resume_ckpt.parent.parent.parent
        self.resuming = resume is not None and resume != ""
        self.accelerator = build_accelerator(dataclasses.replace(run_cfg, grad_accum=1) if accumulates_in_step
                                             else run_cfg, self.run_dir)
        self.state_path = self.run_dir / "state.json"
        self.global_step = 0
        self.samples_saved = False  # Stage.record_samples: the first stage that records wins
        self._check_run_dir()
        self.state = self._load_state()
        self.global_step = int(self.state.get("global_step", 0))
        if self.is_writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, self.run_dir / "config.yaml")
        self.accelerator.wait_for_everyone()
        self.accelerator.init_trackers(recipe, config=_flat_hparams(to_dict(cfg)))
        if run_cfg.deterministic:
            set_deterministic()
        cuda_fast_math(run_cfg.deterministic)
        set_seed(seed)
        self.stop_request = StopRequest().install()  # SIGTERM / SIGUSR1: checkpoint after this step, exit 75

    @classmethod
    def from_cli(cls, config_cls: type, recipe: str, argv=None, default_preset=None, description=None,
                 **kwargs) -> "Run":
        """Parse the command line (preset + overrides, validated), seed and open the run: one call."""
        return cls(parse_config(config_cls, argv, default_preset=default_preset, description=description), recipe,
                   **kwargs)

    # -- set-up ---------------------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        cfg_path = self.run_dir / "config.yaml"
        if not self.resuming:
            if self.state_path.exists() or (self.run_dir / "checkpoints").exists():
                raise UserError(
                    f"output dir '{self.run_dir}' already holds a run. Pass --resume latest to continue it, "
                    f"or choose another --output-dir.")
            return
        if not self.state_path.exists() and not (self.run_dir / "checkpoints").exists():
            raise CheckpointError(
                f"--resume: nothing to resume in '{self.run_dir}' (no state.json, no checkpoints/). "
                f"Start the run without --resume, or point --output-dir at the run to continue.")
        if cfg_path.exists():
            import yaml

            old = yaml.safe_load(cfg_path.read_text()) or {}
            changed = [d for d in diff_configs(old, to_dict(self.cfg))
                       if not any(d.startswith(k + ":") or d.startswith(k + ".") for k in RESUME_FREE_KEYS)
                       and not d.startswith("output_dir:")]
            if changed and self.accelerator.is_main_process:
                print(f"[visrep] warning: resuming '{self.run_dir}' with a config that differs from the "
                      f"saved one in: " + "; ".join(changed), file=sys.stderr)

    def _load_state(self) -> dict:
        if self.resuming and self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {"recipe": self.recipe, "stages": {}, "global_step": 0}

    def save_run_state(self) -> None:
        self.state["global_step"] = self.global_step
        if self.is_writer:
            atomic_write_json(self.state_path, self.state)

    # -- API for recipes ------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def is_writer(self) -> bool:
        return is_writer(self.accelerator)

    def print(self, *args, **kwargs) -> None:
        """Print once for the whole job (the global main process), not once per node."""
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def log(self, values: dict, step: Optional[int] = None) -> None:
        self.accelerator.log(values, step=self.global_step if step is None else step)

    def prepare(self, *objs, grad_clip: Optional[float] = None):
        """``accelerator.prepare`` (convolutional models channels_last first, with ``run.channels_last``)
        with the recipe's gradient clipping written into the DeepSpeed config when DeepSpeed is on
        (Accelerate would otherwise fill its "auto" with 1.0 and clip where DDP does not). Under
        DeepSpeed the engine clips; ``accelerator.clip_grad_norm_`` is a no-op."""
        if self.run_cfg.channels_last:
            for o in objs:
                if isinstance(o, torch.nn.Module):
                    to_channels_last(o)
        configure_engine(self.accelerator, [o for o in objs if isinstance(o, torch.nn.Module)], grad_clip)
        # a sharded stream splits itself by rank; Accelerate would read it on one process and scatter it
        streams = {i: o for i, o in enumerate(objs) if hasattr(o, "start_at")}
        for o in streams.values():
            o.device = self.accelerator.device
        out = self.accelerator.prepare(*(o for i, o in enumerate(objs) if i not in streams))
        if streams:
            rest = iter(out if isinstance(out, tuple) else (out,))
            out = tuple(streams[i] if i in streams else next(rest) for i in range(len(objs)))
            out = out if len(out) > 1 else out[0]
        dtype = engine_precision(self.accelerator)
        if dtype is not None:  # DeepSpeed bf16/fp16 casts the weights, not the inputs
            for obj in (out if isinstance(out, tuple) else (out,)):
                if isinstance(obj, torch.nn.Module):
                    cast_inputs_to_engine(getattr(obj, "module", obj), dtype)
                    fp32_norm_layers(getattr(obj, "module", obj))
        return out

    def autocast(self):
        """Autocast at the run's precision, also under DeepSpeed: for fp32 modules kept outside the
        engine (a frozen teacher). See ``visrep.engine.precision``."""
        return autocast(self.accelerator)

    def stage(self, name: str, **kwargs) -> "Stage":
        return Stage(self, name, **kwargs)

    def write_results(self, results: dict) -> Path:
        path = self.run_dir / "results.json"
        if self.is_writer:
            atomic_write_json(path, results)
        self.accelerator.wait_for_everyone()
        return path

    def finish(self, results: dict, table: str = "") -> dict:
        """The end of a recipe: the final figures to the trackers (numbers only) and ``results.json``, and
        the results table printed once. Returns ``results``."""
        self.log({f"results/{k}": v for k, v in results.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)})
        self.write_results(results)
        if table:
            self.print(table)
        return results

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.stop_request.restore()
        self.accelerator.end_training()
        if exc_type is StopRun:
            self.print(f"[visrep] {exc} Continue with: --resume latest --output-dir {self.run_dir}")
            return True
        return False


def _flat_hparams(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_hparams(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[prefix + k] = v
        else:
            out[prefix + k] = str(v)
    return out


class Stage:
    """One training phase: epochs of batches, the optimizer step (clipping, step, zero_grad, the learning
    rate schedule) and its count, logging, the non-finite check, checkpoints and exact resume. The recipe
    writes the forward, the loss and what follows an optimizer step::

        for epoch in stage.epochs():
            for x, y in stage.batches():
                with accelerator.accumulate(model):
                    loss = ...
                    accelerator.backward(loss)
                if stage.optimizer_step(loss):   # True once per optimizer step, not per micro-batch
                    ema.update(...)
            stage.epoch_done(val_acc=...)
        stage.finish(results)

    Logging, checkpoints and stop requests of a step happen when the loop asks for the next batch, so a
    checkpoint holds what the recipe did after the step (the EMA above). ``model``/``optimizer``/
    ``train_loader`` must already be prepared by the accelerator, and must be the only objects prepared
    (the previous stage's are released by ``finish``). ``schedule``: a :class:`ScheduleConfig` (the
    stage builds its :class:`StepSchedule` over ``epochs``), a ready schedule, or None. ``epoch_setters``
    are objects with ``set_epoch(epoch)`` (sampler, dataset) that make data order and augmentation a
    function of the epoch. ``extra_state`` (or :meth:`track` before the first epoch) maps names to objects
    with ``state_dict``/``load_state_dict`` (EMA counters, GRL progress, ...) saved with each checkpoint.
    A loop that steps the optimizer itself calls :meth:`step_done` instead of :meth:`optimizer_step`.
    """

    def __init__(self, run: Run, name: str, *, model: torch.nn.Module, optimizer, train_loader,
                 epochs: int, schedule=None, epoch_setters: tuple = (), extra_state: Optional[dict] = None,
                 export: Optional[Callable[[Path], None]] = None, grad_clip: Optional[float] = None):
        self.run = run
        self.accelerator: Accelerator = run.accelerator
        self.name = name
        self.model = model
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.num_epochs = epochs
        self.grad_clip = grad_clip
        self.epoch_setters = epoch_setters
        self.extra_state = extra_state or {}
        self.export_fn = export
        self.ckpt_dir = run.run_dir / "checkpoints" / name
        self.model_dir = run.run_dir / "models" / name
        self.batches_per_epoch = len(train_loader)
        accum = self.accelerator.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / accum)
        self.total_steps = self.steps_per_epoch * epochs
        if isinstance(schedule, ScheduleConfig):
            schedule = StepSchedule(optimizer, dataclasses.replace(schedule, epochs=epochs), self.steps_per_epoch)
        self.schedule = schedule
        self.epoch = 0
        self.batch_in_epoch = 0
        self.step = 0
        self.wall_time = 0.0
        self._t0 = time.perf_counter()
        self._window: dict[str, list[float]] = {}
        self._pbar = None
        self._last_saved_step = -1
        self._last_saved_path: Optional[Path] = None
        self._bad_step: Optional[torch.Tensor] = None
        self._agreed_step = -1  # the optimizer step of the last _agree (a save right after needs none)
        self._book_pending = False  # an optimizer_step whose logging / checkpoint waits for the next batch
        self._resume_from: Optional[Path] = None  # loaded when the first epoch starts (after track())
        self._samples_seen = False  # record_samples: acts at its first call only
        record = run.state["stages"].get(name, {})
        self.done = bool(record.get("done"))
        if self.done:  # a stage without an export is restored from its last checkpoint
            self.done = export is not None and self._load_final_weights()
            self.wall_time = float(record.get("wall_time", 0.0))
        if not self.done and run.resuming:
            explicit = run.resume_ckpt if (run.resume_ckpt is not None and run.resume_ckpt.parent.name == name) else None
            if explicit is not None:
                ckpt = self._checked(explicit)
            elif run.resume_ckpt is None or record.get("done"):
                ckpt = self._newest_intact_checkpoint(required=bool(record.get("done")))
            else:
                ckpt = None
            self._resume_from = ckpt
        self.compiled = False
        if not self.done:
            self._compile()

    def _compile(self) -> None:
        """``run.compile``: the training forward of the stage's model compiled in place (visrep.engine.fast)."""
        cfg = self.run.run_cfg
        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        self.compiled, why = compile_decision(cfg.compile, self.total_steps, cfg.compile_min_steps,
                                              self.accelerator.device, deepspeed)
        if self.compiled:
            compile_training_forward(self.model, fallback=cfg.compile == "auto", say=self.run.print)
        elif cfg.compile != "off":
            self.run.print(f"[visrep] stage '{self.name}' runs eager: {why}")

    def track(self, **objects) -> None:
        """Add objects to the checkpointed state (``extra_state``); before the first epoch, so a resumed
        stage restores them too."""
        if self._resume_from is None and self.step > 0:
            raise RuntimeError("Stage.track after training started: pass the objects before the first epoch")
        self.extra_state.update(objects)

    # -- iteration ------------------------------------------------------------------------------
    def epochs(self) -> Iterator[int]:
        if self.done:
            return
        if self._resume_from is not None:
            self._load_checkpoint(self._resume_from)
            self._resume_from = None
        while self.epoch < self.num_epochs:
            # Accelerate's loader re-applies its own epoch counter to the sampler (or dataset) at each
            # pass; keep it equal to ours, including after a resume that started mid-epoch.
            if hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(self.epoch)
            for s in self.epoch_setters:
                s.set_epoch(self.epoch)
            yield self.epoch
        self._close_pbar()

    def batches(self) -> Iterator[Any]:
        loader = self.train_loader
        if self.batch_in_epoch > 0 and hasattr(loader, "start_at"):  # a stream: starts right there, reads nothing before
            loader = loader.start_at(self.batch_in_epoch)
        elif self.batch_in_epoch > 0:
            loader = self.accelerator.skip_first_batches(self.train_loader, self.batch_in_epoch)
        self._open_pbar()
        self._apply_lr()
        for batch in loader:
            yield batch
            if self._book_pending:  # the recipe's body for this batch has finished
                self._book()

    def _apply_lr(self) -> None:
        if self.schedule is not None:
            self.schedule.apply(self.step)

    def record_samples(self, views, data_config: dict, captions=None, decode: Optional[Callable] = None,
                       names: Optional[list[str]] = None, global_views: Optional[int] = None) -> None:
        """Save the first training batch exactly as the model receives it (after every augmentation, on
        the device too) for the report's sample grid: :func:`save_samples` (``data_config``: the mean / std
        to undo; ``captions``: texts, or tokens that ``decode`` turns into texts; ``names``: default "view
        k" / "local k", the first ``global_views`` views being the global ones: :func:`view_names`). Call it
        with every batch, before the forward: it acts once, on the main process, at the first batch of a
        fresh run (never after a resume, whose first batch is not the run's; a run dir that holds samples
        keeps them) and of the run's first stage that records. Nothing collective; a failure is a
        :class:`SamplesWarning` and training goes on."""
        if self._samples_seen:
            return
        self._samples_seen = True
        run = self.run
        if (not run.is_main or run.samples_saved or self.step or self.epoch or self.batch_in_epoch
                or (run.resuming and (run.run_dir / SAMPLES_DIR).exists())):
            return
        run.samples_saved = True
        try:
            if decode is not None and captions is not None:
                captions = decode(captions[:MAX_SAMPLES])
            save_samples(run.run_dir, views, data_config["mean"], data_config["std"], captions, names, self.name,
                         global_views=global_views)
        except Exception as e:  # noqa: BLE001 -- the report's samples never fail a run
            warnings.warn(f"the first training batch was not saved for the report ({run.run_dir / SAMPLES_DIR}): "
                          f"{type(e).__name__}: {e}", SamplesWarning, stacklevel=2)

    # -- bookkeeping ----------------------------------------------------------------------------
    def optimizer_step(self, loss: torch.Tensor, **metrics: Any) -> bool:
        """After a micro-batch's backward: record its loss and metrics and, when gradients were synchronised
        (the last micro-batch of an accumulation), clip them (``grad_clip``), step the optimizer, zero the
        gradients and count the step. Returns whether an optimizer step happened -- the place for what
        must run once per optimizer step (an EMA update, a logit-scale clamp). The step's logging,
        checkpoint and stop checks follow when the loop asks for the next batch (or at ``epoch_done``)."""
        stepped = self.accelerator.sync_gradients
        if stepped:
            if self.grad_clip:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._record(loss, metrics)
        self._book_pending = stepped
        return stepped

    def step_done(self, loss: torch.Tensor, **metrics: Any) -> None:
        """For a loop that steps the optimizer itself: call after every micro-batch. Counts an optimizer
        step when gradients were synchronised, and logs / checkpoints at once.

        Nothing here waits for the device: the loss and metrics stay on it until ``run.log_every``
        optimizer steps have passed, where one collective settles what every rank must agree on (a
        non-finite loss, a stop signal) and the window's means are read once. A checkpoint is only
        written after that check, so it never holds weights trained on a non-finite loss."""
        self._record(loss, metrics)
        if self.accelerator.sync_gradients:
            self._book()

    def _record(self, loss: torch.Tensor, metrics: dict) -> None:
        self.batch_in_epoch += 1
        loss = loss.detach()
        self._note_finite(loss)
        self._window.setdefault("loss", []).append(loss.float())
        for k, v in metrics.items():
            self._window.setdefault(k, []).append(v.detach().float() if isinstance(v, torch.Tensor) else float(v))
        if self.accelerator.sync_gradients:
            self.step += 1
            self.run.global_step += 1

    def _book(self) -> None:
        """After an optimizer step: progress, logging (with the agreement on non-finite losses and stop
        signals), the learning rate of the next step, checkpoints, stops."""
        self._book_pending = False
        if self._pbar is not None:
            self._pbar.update(1)
        stop = False
        if self.step % self.run.run_cfg.log_every == 0:
            stop = self._agree()
            self._flush_window()
        elif self.accelerator.num_processes == 1:
            stop = self.run.stop_request.requested  # one process: nobody to agree with, no collective
        self._apply_lr()
        every = self.run.run_cfg.checkpoint_every
        if every and self.step % every == 0:
            self.save()
        if stop:
            self._stop_for_requeue()
        limit = self.run.run_cfg.stop_after_steps
        if limit is not None and self.run.global_step >= limit:
            if self._last_saved_step != self.step:
                self.save()
            self._close_pbar()
            raise StopRun(f"stopped after {self.run.global_step} optimizer steps (run.stop_after_steps).")

    def _note_finite(self, loss: torch.Tensor) -> None:
        """Remember, on the device, the first optimizer step whose loss was not finite (0: none)."""
        bad = (~torch.isfinite(loss)).any()
        if self._bad_step is None:
            self._bad_step = torch.zeros((), dtype=torch.long, device=loss.device)
        first = torch.full_like(self._bad_step, self.step + 1)
        self._bad_step = torch.where((self._bad_step == 0) & bad, first, self._bad_step)

    def _agree(self) -> bool:
        """One collective (and one read of the device) for what every rank must agree on: a non-finite
        loss on any rank since the last check stops the run (:class:`NonFiniteLossError`); a stop signal
        on any rank (SIGTERM, SIGUSR1) is returned as True, so that all ranks stop after this same step."""
        device = self.accelerator.device
        bad_step = self._bad_step if self._bad_step is not None else torch.zeros((), dtype=torch.long, device=device)
        flags = torch.stack([bad_step.float(), torch.tensor(float(self.run.stop_request.requested), device=device)])
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        any_bad, stop = flags.tolist()
        self._agreed_step = self.step
        if any_bad > 0:
            local = int(bad_step.item())  # read only on this error path
            where = "" if local else " (on another rank)"
            found = list_checkpoints(self.ckpt_dir)
            last = f"the last good checkpoint is '{found[-1]}'" if found else "no checkpoint was written yet"
            self._close_pbar()
            raise NonFiniteLossError(
                f"non-finite loss in stage '{self.name}' at optimizer step {local or self.step}{where} "
                f"(epoch {self.epoch}); {last}. Lower optim.lr, set optim.grad_clip, or check the data.")
        return stop > 0

    def _stop_for_requeue(self) -> None:
        """A stop signal reached some rank: checkpoint this step (all ranks) and leave with "requeue me"."""
        path = self.save() if self._last_saved_step != self.step else self._last_saved_path
        self._close_pbar()
        why = self.run.stop_request.name or "a signal to another rank"
        raise Preempted(f"stopped by {why} after optimizer step {self.step} of stage '{self.name}'; "
                        f"checkpoint '{path}' written. Continue with: --resume latest --output-dir {self.run.run_dir}")

    def _flush_window(self) -> None:
        """Log the means of the window's metrics (one read of the device for all of them)."""
        if not self._window:
            return
        keys = list(self._window)
        means = torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.accelerator.device)
                                          for v in self._window[k]]).mean() for k in keys]).tolist()
        rec = {f"train/{k}": m for k, m in zip(keys, means)}
        rec.update({"stage": self.name, "stage_step": self.step, "epoch": self.epoch,
                    "lr": self.optimizer.param_groups[0]["lr"]})
        self.run.log(rec)
        if self._pbar is not None:
            self._pbar.set_postfix(loss=f"{rec['train/loss']:.4f}")
        self._window = {}

    def epoch_done(self, **metrics: Any) -> None:
        """End of an epoch: log (validation) metrics, checkpoint if checkpointing per epoch."""
        if self._book_pending:  # the loop left its last batch early
            self._book()
        stop = self._agree()  # also before the epoch's checkpoint: a signal during evaluation stops here
        self._flush_window()
        self.epoch += 1
        self.batch_in_epoch = 0
        rec = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        rec.update({"stage": self.name, "stage_step": self.step, "epoch": self.epoch})
        self.run.log(rec)
        if metrics:
            line = f"[{self.name}] epoch {self.epoch}/{self.num_epochs} " + " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
                if k not in ("stage", "epoch"))
            self._pbar.write(line) if self._pbar is not None else self.run.print(line)
        if self.run.run_cfg.checkpoint_every == 0 or self.epoch == self.num_epochs:
            self.save()
        if stop:
            self._stop_for_requeue()

    # -- checkpoints ----------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"stage": self.name, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "step": self.step, "total_steps": self.total_steps, "global_step": self.run.global_step,
                "wall_time": self.wall_time + (time.perf_counter() - self._t0),
                "num_processes": self.accelerator.num_processes, "mixed_precision": self.accelerator.mixed_precision,
                "data_layout": self._data_layout()}

    def _data_layout(self) -> Optional[dict]:
        layout = getattr(self.train_loader, "layout", None)
        return layout() if callable(layout) else None

    def save(self) -> Path:
        """Write a checkpoint as a whole (:func:`visrep.engine.checkpoint.write_dir_atomically`: a
        temporary directory, a manifest of sizes and checksums written last, then a rename), then
        remove all but the last ``run.keep_last``. A full disk raises a ``DiskWriteError`` naming the
        directory; the previous checkpoints stay intact."""
        acc = self.accelerator
        final = self.ckpt_dir / f"{CHECKPOINT_PREFIX}{self.step:08d}"
        if self._agreed_step != self.step:  # never checkpoint weights trained on a non-finite loss
            self._agree()

        def write(tmp: Path) -> None:
            acc.save_state(str(tmp))
            acc.wait_for_everyone()
            for key, obj in self.extra_state.items():
                if getattr(obj, "rank_local", False):  # each rank's own part (e.g. its ZeRO-3 shards)
                    torch.save(obj.state_dict(), tmp / f"extra_{key}_rank{acc.process_index}.pt")
            if self.run.is_writer:
                for key, obj in self.extra_state.items():
                    if not getattr(obj, "rank_local", False):
                        torch.save(obj.state_dict(), tmp / f"extra_{key}.pt")
                atomic_write_json(tmp / "trainer_state.json", self.trainer_state())
                save_yaml(self.run.cfg, tmp / "config.yaml")

        prev = list_checkpoints(self.ckpt_dir)
        keep = f"'{prev[-1]}' is intact" if prev else "no earlier checkpoint exists"
        write_dir_atomically(final, write, writer=self.run.is_writer, barrier=acc.wait_for_everyone,
                             what=f"checkpoint of stage '{self.name}' at step {self.step}",
                             hint=f"The previous checkpoint {keep}. Free space (or choose another --output-dir), "
                                  f"then continue with --resume latest.")
        if self.run.is_writer:
            for old in list_checkpoints(self.ckpt_dir)[:-self.run.run_cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self._last_saved_step = self.step
        self._last_saved_path = final
        self.run.save_run_state()
        acc.wait_for_everyone()
        return final

    # -- resume ---------------------------------------------------------------------------------
    def _checked(self, path: Path) -> Path:
        """``path`` if it verifies against its manifest, else a ``CheckpointError`` saying why."""
        reason = self._on_main(lambda: verify(path))
        if reason is not None:
            raise CheckpointError(f"checkpoint '{path}' is damaged: {reason}. Resume from an intact one "
                                  f"(--resume latest picks the newest intact checkpoint).")
        return path

    def _newest_intact_checkpoint(self, required: bool) -> Optional[Path]:
        """The newest checkpoint of this stage that verifies (the main process checks, all ranks
        follow). Damaged newer ones are reported by path. None when the stage has none yet; a
        ``CheckpointError`` when it has checkpoints (or ``required``) but none is intact."""
        found = list_checkpoints(self.ckpt_dir)
        choice, problems = None, []
        if found:
            def pick():
                return newest_intact(found, lambda m: print(f"[visrep] warning: {m}", file=sys.stderr, flush=True))
            choice, problems = self._on_main(pick)
        if choice is None and (found or required):
            listed = "; ".join(problems) or f"none in '{self.ckpt_dir}'"
            if required:  # a finished stage whose export is damaged, with nothing to rebuild it from
                raise CheckpointError(
                    f"stage '{self.name}' is finished but its export '{self.model_dir}' is damaged and no intact "
                    f"checkpoint of it remains ({listed}). Remove the stage's entry from '{self.run.state_path}' "
                    f"to train it again, or start a new run.")
            raise CheckpointError(
                f"no intact checkpoint of stage '{self.name}' to resume from ({listed}). Delete "
                f"'{self.ckpt_dir}' to run the stage again from its start, or start a new run.")
        return choice

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the main process only (reading and hashing files once per job) and give its
        result to every rank."""
        box = [fn() if self.run.is_main else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(box, from_process=0)
        return box[0]

    def _load_checkpoint(self, path: Path) -> None:
        ts = json.loads((path / "trainer_state.json").read_text())
        if ts.get("stage") != self.name:
            raise CheckpointError(f"checkpoint '{path}' belongs to stage '{ts.get('stage')}', not '{self.name}'.")
        self.accelerator.load_state(str(path))
        for key, obj in self.extra_state.items():
            rank_local = getattr(obj, "rank_local", False)
            f = path / (f"extra_{key}_rank{self.accelerator.process_index}.pt" if rank_local else f"extra_{key}.pt")
            if not f.is_file():
                raise CheckpointError(f"checkpoint '{path}' has no '{f.name}' for state '{key}' (written by "
                                      f"a recipe with other state); resume it with the recipe that wrote it.")
            obj.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
        self.epoch, self.batch_in_epoch = int(ts["epoch"]), int(ts["batch_in_epoch"])
        saved, now = ts.get("data_layout"), self._data_layout()
        if saved is not None and now is not None and saved != now and self.batch_in_epoch > 0:
            self.run.print(f"[visrep] warning: the stream was checkpointed with {saved} and resumes with {now}: the "
                           f"rest of epoch {self.epoch} follows the new layout, so some of its samples may be seen "
                           f"twice or not at all (later epochs are whole). Resume with the same processes, "
                           f"run.num_workers and batch size to continue exactly.")
        self.step = int(ts["step"])
        self.run.global_step = int(ts["global_step"])
        self.wall_time = float(ts.get("wall_time", 0.0))
        self._last_saved_step = self.step
        self._last_saved_path = path
        if self.run.is_main:
            truncate_metrics(self.run.run_dir / "metrics.jsonl", self.name, self.step)
            for tracker in self.accelerator.trackers:
                if isinstance(tracker, JSONLTracker):
                    tracker.reopen()
        self.run.print(f"[visrep] resumed stage '{self.name}' from '{path}' (epoch {self.epoch}, "
                       f"batch {self.batch_in_epoch}, step {self.step}/{self.total_steps})")

    def _load_final_weights(self) -> bool:
        """Load a finished stage's export. If the export is damaged (checked against its manifest),
        report it and return False: the stage then resumes from its last intact checkpoint (the one
        written at its end) and is exported again."""
        from safetensors.torch import load_file

        reason = self._on_main(lambda: verify(self.model_dir))
        if reason is not None:
            self.run.print(f"[visrep] warning: stage '{self.name}' is finished but its export '{self.model_dir}' "
                           f"is damaged ({reason}); restoring it from the stage's last checkpoint")
            return False
        f = self.model_dir / "model.safetensors"
        load_full_state_dict(self.accelerator, self.model, load_file(str(f)))
        self.run.print(f"[visrep] stage '{self.name}' already finished; loaded '{f}'")
        return True

    def finish(self, results: Optional[dict] = None) -> dict:
        """Mark the stage done: export its weights, record results and wall time, release the
        accelerator's references so the next stage starts clean. Returns the stage's results."""
        acc = self.accelerator
        record = self.run.state["stages"].get(self.name, {})
        if not self.done:
            self._close_pbar()
            self.wall_time += time.perf_counter() - self._t0
            if self.export_fn is not None:
                write_dir_atomically(self.model_dir, self.export_fn, writer=self.run.is_writer,
                                     barrier=acc.wait_for_everyone, what=f"export of stage '{self.name}'",
                                     hint="Free space (or choose another --output-dir), then continue with "
                                          "--resume latest.")
            record = {"done": True, "wall_time": self.wall_time, "steps": self.step,
                      "results": results or {}}
            self.run.state["stages"][self.name] = record
            self.run.save_run_state()
            self.done = True
        acc.wait_for_everyone()
        acc.free_memory()
        return dict(record.get("results", {}), wall_time=record.get("wall_time", 0.0))

    # -- progress -------------------------------------------------------------------------------
    def _open_pbar(self) -> None:
        if self._pbar is None and self.run.run_cfg.progress and self.run.is_main:
            from tqdm.auto import tqdm

            # a terminal gets a live bar; a log file (SLURM, CI) one line every 30 s
            self._pbar = tqdm(total=self.total_steps, initial=self.step, desc=self.name, dynamic_ncols=True,
                              file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 30.0)

    def _close_pbar(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
