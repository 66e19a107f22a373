"""Mixed precision: the launcher's choice, native bf16 only, DeepSpeed's bf16 engine fed bf16 inputs with
fp32 normalisation layers; every recipe under DeepSpeed ZeRO-2 bf16 on CPU."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import free_port, write_preset
from visrep.engine.precision import (cast_inputs_to_engine, fp32_norm_layers, norm_layers_count,
                                     resolve_mixed_precision)


def test_auto_defers_to_the_launcher_and_explicit_values_win(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_mixed_precision("auto") == ("bf16" if torch.cuda.is_available() else "no")
    for launcher in ("no", "bf16", "fp16"):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
        assert resolve_mixed_precision("auto") == launcher
        assert resolve_mixed_precision("fp16") == "fp16" and resolve_mixed_precision("no") == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_mixed_precision("auto") == "no", "emulated bf16 (V100, T4) is not chosen"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_mixed_precision("auto") == "bf16"


def _bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 1), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(),
                               torch.nn.LayerNorm(4 * 6 * 6), torch.nn.Linear(4 * 6 * 6, 3))


def test_bf16_engine_module_takes_fp32_inputs_and_norms_compute_in_fp32():
    """What DeepSpeed bf16 makes of a module -- bf16 parameters, fp32 buffers -- fails on its first
    forward; with the input cast and fp32 norm layers it runs, close to the fp32 module, and its
    norm statistics are the fp32 module's running statistics to bf16 input rounding."""
    ref, net = _bn_net(), _bn_net()
    for p in net.parameters():
        p.data = p.data.to(torch.bfloat16)
    x = torch.randn(5, 3, 6, 6)
    with pytest.raises(RuntimeError):
        net(x)
    hooks = cast_inputs_to_engine(net, torch.bfloat16)
    assert len(hooks) == 1 + 6  # the module and each module holding parameters
    assert fp32_norm_layers(net) == norm_layers_count(net) == 3
    out = net(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref(x), atol=0.08, rtol=0.05)
    assert net[1].running_mean.dtype == torch.float32
    torch.testing.assert_close(net[1].running_mean, ref[1].running_mean, atol=5e-3, rtol=0.02)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in net.parameters())
    net.eval(), ref.eval()
    torch.testing.assert_close(net[1](x.new_ones(2, 8, 2, 2)).float(), ref[1](x.new_ones(2, 8, 2, 2)),
                               atol=0.02, rtol=0.02)
    net[0](x)  # a submodule called on its own (an encoder in evaluation) also gets its input cast


def test_fp32_norm_forward_equals_torch_in_fp32():
    """The replacement forward is the module's own in fp32: same outputs, same running statistics,
    same num_batches_tracked, in train and eval, with momentum=None (cumulative average) too."""
    for momentum in (0.1, None):
        a = torch.nn.BatchNorm2d(6, momentum=momentum)
        b = torch.nn.BatchNorm2d(6, momentum=momentum)
        b.load_state_dict(a.state_dict())
        fp32_norm_layers(b)
        for train in (True, True, False):
            a.train(train), b.train(train)
            x = torch.randn(4, 6, 3, 3)
            assert torch.equal(a(x), b(x))
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k


DS_BF16 = ["--use_deepspeed", "--num_processes", "1", "--zero_stage", "2", "--mixed_precision", "bf16"]
RECIPES = ["distill", "byol", "clip", "finetune", "adapt"]


def one_epoch_presets() -> dict:
    """Each recipe's test preset cut to one epoch (no L2-SP: refused under ZeRO-3, kept out here too)."""
    from test_adapt_recipe import TINY as ADAPT
    from test_clip_recipe import TINY as CLIP
    from test_deepspeed_byol import TINY as BYOL
    from test_distill_recipe import TINY as DISTILL
    from test_finetune_recipe import TINY as FINETUNE

    one = {"schedule": {"epochs": 1, "warmup_epochs": 0.5}}

    def few(data: dict, fraction: float = 0.1) -> dict:  # bf16 matmuls are slow on a CPU: a few steps each
        return dict(data, label_fraction=fraction)

    return {"distill": dict(DISTILL, data=few(DISTILL["data"]), teacher=dict(DISTILL["teacher"], train_epochs=1),
                            **one),
            "byol": dict(BYOL, data=few(BYOL["data"]), **one), "clip": dict(CLIP, **one),
            "finetune": dict(FINETUNE, data=few(FINETUNE["data"]), source_data=few(FINETUNE["source_data"]),
                             init=dict(FINETUNE["init"], train_epochs=1), compare_scratch=False,
                             finetune={k: v for k, v in FINETUNE["finetune"].items() if not k.startswith("l2sp")},
                             **one),
            "adapt": dict(ADAPT, source=few(ADAPT["source"], 0.15), **one)}


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    """Every recipe trained under DeepSpeed ZeRO-2 bf16 (one process), all five in one launch of
    tests/recipes_in_one_process_script.py: {recipe: run directory}."""
    pytest.importorskip("deepspeed")
    import subprocess

    import helpers

    d = tmp_path_factory.mktemp("bf16")
    pairs = [f"{r}={write_preset(d / f'{r}.yaml', p)}" for r, p in one_epoch_presets().items()]
    cmd = [*helpers.ACCELERATE_LAUNCH, *DS_BF16, "--main_process_port", str(free_port()),
           str(helpers.ROOT / "tests" / "recipes_in_one_process_script.py"), str(d / "status.json"), *pairs]
    env = {k: v for k, v in helpers._base_env().items() if k != "ACCELERATE_USE_CPU"}  # which turns DeepSpeed off
    p = subprocess.run(cmd, cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0 and (d / "status.json").exists(), p.stdout[-3000:] + p.stderr[-6000:]
    status = json.loads((d / "status.json").read_text())
    assert status == {r: 0 for r in RECIPES}, (status, p.stderr[-6000:])
    return {r: d / r for r in RECIPES}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_under_deepspeed_zero2_bf16(recipe, bf16_runs):
    """Before: 'Input type (torch.FloatTensor) and weight type (CPUBFloat16Type) should be the same' at
    the first forward of every recipe. Now each trains, evaluates and exports (fp32 weights, from the
    optimizer's fp32 master copies) in bf16, which the checkpoint records."""
    out = bf16_runs[recipe]
    assert json.loads((out / "results.json").read_text())
    ckpts = sorted((out / "checkpoints").glob("*/step_*"))
    assert ckpts and all(json.loads((c / "trainer_state.json").read_text())["mixed_precision"] == "bf16"
                         for c in ckpts)
    # DeepSpeed's own record of its config: buckets sized from the model, not 5e8 elements
    states = torch.load(ckpts[-1] / "pytorch_model" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    zero = states["ds_config"]["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] < 50_000_000, zero
    for f in (out / "models").glob("*/model.safetensors"):
        w = load_file(str(f))
        floats = [v for v in w.values() if v.is_floating_point()]
        assert floats and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in floats), f


@pytest.mark.slow
def test_deepspeed_bf16_trains_like_autocast_bf16(bf16_runs, tmp_path):
    """The adaptation run under DeepSpeed bf16 (bf16 weights, fp32 master copies) and the same run under
    Accelerate's bf16 autocast (the DDP path: fp32 weights, bf16 matmuls) train alike: the same data and
    initial weights, per-step losses that differ by bf16 rounding only."""
    from helpers import in_process

    out, amp = bf16_runs["adapt"], tmp_path / "amp"
    p = in_process("adapt", ["--config", str(out.parent / "adapt.yaml"), "--output-dir", str(amp)],
                   env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert p.returncode == 0, p.stderr[-4000:]
    ckpt = sorted((amp / "checkpoints").glob("*/step_*"))[-1]
    assert json.loads((ckpt / "trainer_state.json").read_text())["mixed_precision"] == "bf16"
    losses = [[r["train/loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if "train/loss" in r] for d in (out, amp)]
    assert len(losses[0]) == len(losses[1]) > 2
    assert losses[0][0] == pytest.approx(losses[1][0], rel=0.01)  # measured: 3e-4
    assert sum(losses[0]) == pytest.approx(sum(losses[1]), rel=0.05)  # measured: 2.5%
    for a, b in zip(*losses):
        assert a == pytest.approx(b, rel=0.15)  # measured: at most 6%
