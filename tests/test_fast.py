"""The fast paths (visrep.engine.fast, FrozenTeacher.compile_inference, gradient checkpointing): each takes
the eager step, to a stated tolerance, and says clearly when it cannot run."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from helpers import reset_accelerate as reset
from visrep.checks import ConfigError
from visrep.distill import FrozenTeacher
from visrep.engine import OptimConfig, Run, RunConfig, build_optimizer
from visrep.engine.fast import compile_decision, compile_training_forward, compiler_missing, is_compiled
from visrep.zoo import create_backbone


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def frames_compiled() -> int:
    return int(torch._dynamo.utils.counters["frames"]["ok"])


# ---- the decision -------------------------------------------------------------------------------
def test_compile_decision_follows_the_mode_the_stage_length_and_the_compiler(monkeypatch):
    assert compile_decision("off", 10_000, 400, "cpu") == (False, "run.compile is off")
    assert compile_decision("on", 5, 400, "cpu")[0] is True
    assert compile_decision("auto", 400, 400, "cpu")[0] is True
    on, why = compile_decision("auto", 399, 400, "cpu")
    assert not on and "399 steps < run.compile_min_steps (400)" in why
    on, why = compile_decision("auto", 10_000, 400, "cpu", deepspeed=True)
    assert not on and "DeepSpeed" in why
    with pytest.raises(ConfigError, match="run.compile is 'on' but DeepSpeed"):
        compile_decision("on", 10_000, 400, "cpu", deepspeed=True)

    # no C++ compiler on the PATH: auto runs eager and says why, on is one clear error
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "no C++ compiler" in compiler_missing("cpu")
    on, why = compile_decision("auto", 10_000, 400, "cpu")
    assert not on and "no C++ compiler" in why
    with pytest.raises(ConfigError, match=r"run.compile is 'on' but no C\+\+ compiler .* Set run.compile to 'auto'"):
        compile_decision("on", 10_000, 400, "cpu")


# ---- the compiled forward -------------------------------------------------------------------------
def _tiny_cnn():
    torch.manual_seed(0)
    return create_backbone("resnet20", num_classes=3, small_input=True, width=0.25)


def _train(model, steps=3, batch=8):
    opt = build_optimizer(model, OptimConfig(lr=0.05, implementation="foreach"))
    g = torch.Generator().manual_seed(1)
    losses = []
    model.train()
    for _ in range(steps):
        x, y = torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 3, (batch,), generator=g)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.slow
def test_compiled_training_step_equals_eager_and_evaluation_stays_eager():
    """The compiled forward + backward of a ResNet takes the eager SGD steps: the same losses and weights
    after 3 steps within 1e-5 (inductor fuses and reorders float sums). In eval mode the module runs its
    eager forward: another batch size compiles nothing more."""
    eager_losses, eager_w = _train(_tiny_cnn())
    model = compile_training_forward(_tiny_cnn(), fallback=False)
    assert is_compiled(model)
    losses, w = _train(model)
    assert frames_compiled() >= 1
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), atol=1e-5, rtol=1e-5)
    for a, b in zip(w, eager_w):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    before = frames_compiled()
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(5, 3, 16, 16))
    assert out.shape == (5, 3) and frames_compiled() == before


def test_a_compiler_failure_falls_back_to_eager_or_raises():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("simulated compiler crash")

    said = []
    model = compile_training_forward(torch.nn.Linear(4, 2), fallback=True, say=said.append, backend=broken_backend)
    x = torch.randn(3, 4)
    out = model(x)
    torch.testing.assert_close(out, F.linear(x, model.weight, model.bias))
    assert len(said) == 1 and "torch.compile failed" in said[0] and "simulated compiler crash" in said[0]
    model(x)
    assert len(said) == 1  # said once, eager from then on

    torch._dynamo.reset()
    strict = compile_training_forward(torch.nn.Linear(4, 2), fallback=False, backend=broken_backend)
    with pytest.raises(Exception, match="simulated compiler crash"):
        strict(x)


@dataclasses.dataclass
class ToyConfig:
    lr: float = 0.1


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("mode", ["on", "off"])
def test_stage_compiles_by_run_config_and_trains_as_eager(tmp_path, mode, capsys):
    """A stage compiles its model per run.compile; the compiled run ends with the eager run's weights."""
    def run_stage(mode, out):
        reset()
        cfg = RunConfig(progress=False, compile=mode, compile_min_steps=1000)
        with Run(ToyConfig(), "toy", str(out), 0, cfg) as run:
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
            g = torch.Generator().manual_seed(0)
            x = torch.randn(32, 5, generator=g)
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)),
                                                 batch_size=8)
            model, opt, loader = run.prepare(model, build_optimizer(model, OptimConfig(lr=0.05)), loader)
            stage = run.stage("s", model=model, optimizer=opt, train_loader=loader, epochs=2)
            for _ in stage.epochs():
                for xb, yb in stage.batches():
                    loss = F.mse_loss(model(xb), yb)
                    run.accelerator.backward(loss)
                    stage.optimizer_step(loss)
                stage.epoch_done()
            stage.finish()
            return stage.compiled, [p.detach().clone() for p in model.parameters()]

    compiled, w = run_stage(mode, tmp_path / mode)
    assert compiled is (mode == "on")
    _, eager = run_stage("off", tmp_path / "ref")
    for a, b in zip(w, eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    # auto: 8 steps are fewer than compile_min_steps, so the stage runs eager and says why
    capsys.readouterr()
    compiled, _ = run_stage("auto", tmp_path / "auto")
    assert not compiled and "runs eager: 8 steps < run.compile_min_steps (1000)" in capsys.readouterr().out


# ---- the frozen teacher -----------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_teacher_gives_the_eager_logits_as_ordinary_tensors():
    """The teacher runs in inference mode, compiled or not; its logits are ordinary tensors that a
    student's loss can save for its backward, and compiled they equal eager within 1e-5."""
    torch.manual_seed(0)
    net = create_backbone("resnet20", num_classes=3, small_input=True, width=0.25)
    net.eval()
    x = torch.randn(8, 3, 16, 16)
    eager = FrozenTeacher(net)(x)
    teacher = FrozenTeacher(net).compile_inference()
    out = teacher(x)
    assert not out.is_inference() and not out.requires_grad
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    student = torch.randn(8, 3, requires_grad=True)
    F.kl_div(F.log_softmax(student, 1), F.softmax(out, 1), reduction="batchmean").backward()
    assert student.grad is not None


# ---- gradient checkpointing --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet20", "googlenet"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    """Each stage recomputed in the backward: the same loss and gradients as keeping the activations (the
    same ops run again: equal within 1e-6). In eval mode nothing is checkpointed."""
    kw = dict(num_classes=3, small_input=True, **({"width": 0.25} if name == "resnet20" else {}))
    size = 16 if name == "resnet20" else 32
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 0])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = create_backbone(name, grad_checkpointing=ckpt, **kw)
        assert model.grad_checkpointing is ckpt
        model.train()
        torch.manual_seed(1)  # the same dropout masks
        out = model(x)
        F.cross_entropy(out if torch.is_tensor(out) else out[0], y).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_on_a_model_without_it_is_a_clear_error():
    from visrep.zoo import registry

    msg = "'plain' \\(Linear\\) has no gradient checkpointing; set grad_checkpointing false"
    with pytest.raises(ValueError, match=msg):
        registry._checkpointed(torch.nn.Linear(2, 2), "plain", True)
