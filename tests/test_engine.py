"""The shared loop: non-finite losses, atomic checkpoints, pruning, exact in-process resume."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import reset_accelerate as reset
from visrep.engine import NonFiniteLossError, Run, RunConfig, ScheduleConfig, StepSchedule, list_checkpoints
from visrep.engine.optim import build_optimizer
from visrep.engine.config import OptimConfig
from visrep.errors import CheckpointError, DiskWriteError, UserError


@dataclasses.dataclass
class ToyConfig:
    lr: float = 0.1


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def toy_parts(seed=0, n=48, batch=8):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(n, 5, generator=g), torch.randn(5, 1, generator=g)
    ds = torch.utils.data.TensorDataset(x, x @ w)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)
    torch.manual_seed(seed)
    model = torch.nn.Linear(5, 1)
    return model, build_optimizer(model, OptimConfig(lr=0.05, weight_decay=0.0)), loader


def prepared_toy(run, **kw):
    """The toy parts prepared by the run's accelerator: (accelerator, model, optimizer, loader)."""
    acc = run.accelerator
    return (acc, *acc.prepare(*toy_parts(**kw)))


def mse(model, x, y):
    return ((model(x) - y) ** 2).mean()


def backward_and_step(acc, opt, loss):
    """A plain optimizer step written out by hand (the loops that report it with ``stage.step_done``)."""
    acc.backward(loss)
    opt.step()
    opt.zero_grad()


def backward_mse(acc, model, x, y):
    """The toy loss of a batch, back-propagated through the accelerator: the loss."""
    loss = mse(model, x, y)
    acc.backward(loss)
    return loss


def train(run, name, epochs, nan_at=None, accum=1):
    acc, model, opt, loader = prepared_toy(run)
    sched = StepSchedule(opt, ScheduleConfig(epochs=epochs, warmup_epochs=0.5), -(-len(loader) // accum))
    stage = run.stage(name, model=model, optimizer=opt, train_loader=loader, epochs=epochs, schedule=sched)
    for _ in stage.epochs():
        for x, y in stage.batches():
            with acc.accumulate(model):
                loss = mse(model, x, y) * (float("nan") if stage.step == nan_at else 1.0)
                backward_and_step(acc, opt, loss)
            stage.step_done(loss)
        stage.epoch_done()
    return acc.unwrap_model(model), stage


def test_nonfinite_loss_names_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg = RunConfig(checkpoint_every=2, keep_last=5, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 5 .*step_00000004"):
        with Run(ToyConfig(), "toy", str(tmp_path / "run"), 0, cfg) as run:
            train(run, "s", epochs=2, nan_at=4)
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints" / "s")
    assert [c.name for c in ckpts] == ["step_00000002", "step_00000004"]
    weights = load_file(str(ckpts[-1] / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not list((tmp_path / "run" / "checkpoints" / "s").glob(".tmp-*"))


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    cfg = RunConfig(checkpoint_every=3, progress=False)
    with Run(ToyConfig(), "toy", str(tmp_path / "run"), 0, cfg) as run:
        real = run.accelerator.save_state
        calls = {"n": 0}

        def flaky(path):
            calls["n"] += 1
            real(path)
            if calls["n"] == 2:
                raise OSError("disk full")

        monkeypatch.setattr(run.accelerator, "save_state", flaky)
        with pytest.raises(DiskWriteError, match=r"checkpoint of stage 's' at step 6 in '.*checkpoints/s': disk full"
                                                 r".*'.*step_00000003' is intact"):
            train(run, "s", epochs=2)
    d = tmp_path / "run" / "checkpoints" / "s"
    assert [c.name for c in list_checkpoints(d)] == ["step_00000003"]
    assert sorted(p.name for p in d.iterdir()) == ["step_00000003"]


def test_keep_last_prunes_and_state_records_stage(tmp_path):
    with Run(ToyConfig(), "toy", str(tmp_path / "run"), 0, RunConfig(checkpoint_every=1, keep_last=2,
                                                                   progress=False, log_every=1)) as run:
        _, stage = train(run, "s", epochs=1)
        stage.finish({"x": 1.0})
    d = tmp_path / "run" / "checkpoints" / "s"
    assert [c.name for c in list_checkpoints(d)] == ["step_00000005", "step_00000006"]
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["stages"]["s"]["done"] and state["stages"]["s"]["results"] == {"x": 1.0}
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage_step"] for r in lines if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


def test_run_dir_safety(tmp_path):
    with Run(ToyConfig(), "toy", str(tmp_path / "run"), 0, RunConfig(progress=False)) as run:
        train(run, "s", epochs=1)
    reset()
    with pytest.raises(UserError, match="--resume latest"):
        Run(ToyConfig(), "toy", str(tmp_path / "run"), 0, RunConfig(progress=False))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Run(ToyConfig(), "toy", str(tmp_path / "empty"), 0, RunConfig(progress=False), resume="latest")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        Run(ToyConfig(), "toy", str(tmp_path / "x"), 0, RunConfig(progress=False), resume=str(tmp_path))


@pytest.mark.parametrize("accum", [1, 2])
def test_in_process_resume_equals_straight_run(tmp_path, accum):
    cfg = RunConfig(checkpoint_every=0, progress=False, grad_accum=accum, log_every=1)
    with Run(ToyConfig(), "toy", str(tmp_path / "a"), 0, cfg) as run:
        straight, _ = train(run, "s", epochs=3, accum=accum)
    reset()
    stop = dataclasses.replace(cfg, stop_after_steps=4)  # mid-epoch 1 (3 steps per epoch at accum 2)
    with Run(ToyConfig(), "toy", str(tmp_path / "b"), 0, stop) as run:
        train(run, "s", epochs=3, accum=accum)
    reset()
    with Run(ToyConfig(), "toy", str(tmp_path / "b"), 0, cfg, resume="latest") as run:
        resumed, stage = train(run, "s", epochs=3, accum=accum)
    assert stage.step == 3 * (6 // accum)
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=1e-6)
    steps = [json.loads(l)["stage_step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in l]
    assert steps == list(range(1, 3 * (6 // accum) + 1)), "one record per step, none lost or repeated on resume"


def test_resume_mid_epoch_with_shuffled_sampler_and_per_epoch_dataset(tmp_path):
    """The sampler order and the dataset's epoch must follow our epoch, also after a mid-epoch resume."""
    from visrep.data import EpochSampler

    class EpochData(torch.utils.data.Dataset):
        def __init__(self):
            self.epoch, self.seen = 0, []

        def set_epoch(self, e):
            self.epoch = e

        def __len__(self):
            return 12

        def __getitem__(self, i):
            return torch.tensor([float(i), float(self.epoch)])

    def go(out, resume=None, stop=None):
        ds, sampler, seen = EpochData(), EpochSampler(12, seed=3), []
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler)
        with Run(ToyConfig(), "toy", str(out), 0, RunConfig(progress=False, stop_after_steps=stop),
                 resume=resume) as run:
            model = torch.nn.Linear(2, 1)
            opt = build_optimizer(model, OptimConfig(lr=0.01, weight_decay=0.0))
            model, opt, loader = run.accelerator.prepare(model, opt, loader)
            stage = run.stage("s", model=model, optimizer=opt, train_loader=loader, epochs=3,
                              epoch_setters=(sampler, ds))
            for _ in stage.epochs():
                for x in stage.batches():
                    seen += [tuple(r) for r in x.tolist()]  # (index, dataset epoch) trained on
                    loss = model(x).pow(2).mean()
                    backward_and_step(run.accelerator, opt, loss)
                    stage.step_done(loss)
                stage.epoch_done()
        reset()
        return seen

    straight = go(tmp_path / "a")
    first = go(tmp_path / "b", stop=8)  # epoch 1, batch 2
    rest = go(tmp_path / "b", resume="latest")
    assert len(straight) == 36 and first + rest == straight
    assert [e for _, e in straight] == [0.0] * 12 + [1.0] * 12 + [2.0] * 12


def test_no_host_sync_between_log_steps(tmp_path, monkeypatch):
    """The loop reads the device only every run.log_every optimizer steps (the non-finite check, the
    stop-signal agreement and the metric means share those reads): over 20 steps with log_every=10 and
    a metric tensor per step, 4 reads -- not 2 per step (40) as with a read per metric and step."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if counting[0]:
                reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counting = [False]
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(200, 5, generator=g), torch.randn(200, 1, generator=g))
    with Run(ToyConfig(), "toy", str(tmp_path / "r"), 0, RunConfig(progress=False, log_every=10)) as run:
        model = torch.nn.Linear(5, 1)
        opt = build_optimizer(model, OptimConfig(lr=0.01, weight_decay=0.0))
        model, opt, loader = run.accelerator.prepare(model, opt, torch.utils.data.DataLoader(ds, batch_size=8))
        stage = run.stage("s", model=model, optimizer=opt, train_loader=loader, epochs=1)
        for _ in stage.epochs():
            for x, y in stage.batches():
                out = model(x)
                loss = ((out - y) ** 2).mean()
                backward_and_step(run.accelerator, opt, loss)
                counting[0] = 1 <= stage.step < 21
                stage.step_done(loss, out_std=out.std())
                counting[0] = False
                if stage.step == 21:
                    break
            break
    assert len(reads) == 4, reads
    logged = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in logged if "train/loss" in r]
    assert [r["stage_step"] for r in rows] == [10, 20] and all("train/out_std" in r for r in rows)


def test_collective_timeout_reaches_the_process_group(tmp_path):
    from datetime import timedelta

    with Run(ToyConfig(), "toy", str(tmp_path / "r"), 0, RunConfig(progress=False, dist_timeout_s=77)) as run:
        assert run.accelerator.init_handler.timeout == timedelta(seconds=77)
    from visrep.engine import ConfigError, from_dict

    with pytest.raises(ConfigError, match="dist_timeout_s"):
        from visrep.engine.config import validate
        validate(from_dict(RunConfig, {"dist_timeout_s": 0}))


# ------------------------------------------------------------------ the stage owns its step
class Counter:
    """State changed once per optimizer step (like an EMA), checkpointed with the stage."""

    def __init__(self, total):
        self.total, self.n, self.seen = total, 0, []

    def state_dict(self):
        return {"n": self.n, "total": self.total}

    def load_state_dict(self, s):
        self.n = s["n"]


def step_loop(run, epochs=2, accum=2, grad_clip=None):
    """optimizer_step with accumulation: the after-step hook runs once per optimizer step and a
    checkpoint written at a step boundary already holds what it did."""
    acc, model, opt, loader = prepared_toy(run)
    stage = run.stage("s", model=model, optimizer=opt, train_loader=loader, epochs=epochs,
                      schedule=ScheduleConfig(epochs=99, warmup_epochs=0.5), grad_clip=grad_clip)
    counter = Counter(stage.total_steps)
    stage.track(counter=counter)
    hooks = []
    for _ in stage.epochs():
        for x, y in stage.batches():
            with acc.accumulate(model):
                loss = backward_mse(acc, model, x, y)
            if stage.optimizer_step(loss, half=loss / 2):
                counter.n += 1
                hooks.append(stage.step)
        stage.epoch_done()
    return acc.unwrap_model(model), stage, counter, hooks


def test_optimizer_step_once_per_step_with_schedule_clip_and_checkpointed_hook(tmp_path):
    cfg = RunConfig(grad_accum=2, checkpoint_every=1, keep_last=10, progress=False, log_every=1)
    with Run(ToyConfig(), "toy", str(tmp_path / "a"), 0, cfg) as run:
        model, stage, counter, hooks = step_loop(run, grad_clip=0.05)
    assert stage.steps_per_epoch == 3 and stage.total_steps == 6  # 6 batches / accumulation 2, 2 epochs
    assert hooks == [1, 2, 3, 4, 5, 6] and counter.n == 6 and counter.total == 6
    # the schedule spans the stage's epochs (2), not the ScheduleConfig's own (99): warm-up, then cosine to 0
    assert stage.schedule.total_steps == 6 and stage.schedule.warmup_steps == 2
    for c in list_checkpoints(tmp_path / "a" / "checkpoints" / "s"):
        step = int(c.name.split("_")[1])
        assert torch.load(c / "extra_counter.pt", weights_only=True)["n"] == step  # the hook of that step is in
    recs = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in recs if "train/loss" in r]
    assert [r["stage_step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["train/half"] == pytest.approx(r["train/loss"] / 2) for r in rows)


def test_optimizer_step_equals_a_hand_written_step_and_resumes_exactly(tmp_path):
    """The stage's step (clip, step, zero_grad) trains exactly as the loop written out by hand; a run
    stopped mid-way and resumed (the tracked state restored before the first epoch) ends equal."""
    cfg = RunConfig(grad_accum=2, progress=False, log_every=1)
    with Run(ToyConfig(), "toy", str(tmp_path / "a"), 0, cfg) as run:
        straight, _, counter_a, _ = step_loop(run, grad_clip=0.05)
    reset()
    # by hand: the same clipping and steps, via step_done
    with Run(ToyConfig(), "toy", str(tmp_path / "h"), 0, cfg) as run:
        acc, model, opt, loader = prepared_toy(run)
        stage = run.stage("s", model=model, optimizer=opt, train_loader=loader, epochs=2,
                          schedule=StepSchedule(opt, ScheduleConfig(epochs=2, warmup_epochs=0.5), 3))
        for _ in stage.epochs():
            for x, y in stage.batches():
                with acc.accumulate(model):
                    loss = mse(model, x, y)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(model.parameters(), 0.05)
                    opt.step()
                    opt.zero_grad()
                stage.step_done(loss)
            stage.epoch_done()
        by_hand = acc.unwrap_model(model)
    reset()
    for a, b in zip(straight.parameters(), by_hand.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with Run(ToyConfig(), "toy", str(tmp_path / "b"), 0, dataclasses.replace(cfg, stop_after_steps=4)) as run:
        step_loop(run, grad_clip=0.05)
    reset()
    with Run(ToyConfig(), "toy", str(tmp_path / "b"), 0, cfg, resume="latest") as run:
        resumed, _, counter_b, hooks = step_loop(run, grad_clip=0.05)
    assert hooks == [5, 6] and counter_b.n == counter_a.n == 6
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_channels_last_prepares_conv_models_nhwc_and_takes_the_same_steps(tmp_path):
    """run.channels_last: a convolutional model comes out of Run.prepare with NHWC weights (a model
    without convolutions is left as it is) and trains as the NCHW one does: the same weights after 3
    SGD steps within 1e-5 (oneDNN picks other kernels for the other layout: float rounding only)."""
    import torch.nn.functional as F

    from visrep.zoo import create_backbone

    def train(channels_last):
        reset()
        cfg = RunConfig(progress=False, channels_last=channels_last)
        with Run(ToyConfig(), "toy", str(tmp_path / str(channels_last)), 0, cfg) as run:
            torch.manual_seed(0)
            model = create_backbone("resnet20", num_classes=3, small_input=True, width=0.25)
            linear = torch.nn.Linear(4, 2)
            model, linear, opt = run.prepare(model, linear, build_optimizer(model, OptimConfig(lr=0.05)))
            convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
            layout = {w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs}
            assert linear.weight.is_contiguous()
            g = torch.Generator().manual_seed(1)
            for _ in range(3):
                x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 3, (8,), generator=g)
                run.accelerator.backward(F.cross_entropy(model(x), y))
                opt.step()
                opt.zero_grad()
            return layout, [p.detach().contiguous() for p in model.parameters()]

    layout, fast = train(True)
    assert layout == {True}
    layout, eager = train(False)
    assert layout == {False}
    for a, b in zip(fast, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
