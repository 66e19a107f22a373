"""The transfer recipes under DeepSpeed (CPU, gloo) end with exactly the weights of the same runs under DDP:
fine-tuning (source -> linear probe -> LP-FT with a frozen stem and per-stage learning rates -> scratch
baseline, each stage a new DeepSpeed engine) under ZeRO-3, and DANN (gradient reversal, domain
discriminator, best-epoch selection) under ZeRO-3 stopped mid-epoch and resumed. ZeRO-2 runs of both
matched DDP as well when these tests still ran them; they were dropped to keep the suite within its
budget (ZeRO-2 keeps parameters whole, the easier case; every recipe still runs under ZeRO-2 bf16 in
tests/test_precision.py, and CLIP compares ZeRO-2 with DDP). The ZeRO-3 runs partition every
parameter (persistence threshold 0). What DeepSpeed cannot do is refused."""
import pytest

from ds_helpers import (assert_same_weights, fake_accelerator, load_recipe, without_use_cpu,
                        zero_config_args)
from helpers import ddp_reference, free_port, results, run_recipe
from test_finetune_recipe import TINY as FINETUNE_TINY

pytest.importorskip("deepspeed")

# the fine-tuning test's preset without L2-SP (refused under ZeRO-3), with weight decay instead
FINETUNE = dict(FINETUNE_TINY, finetune={k: v for k, v in FINETUNE_TINY["finetune"].items() if not k.startswith("l2sp")},
                optim=dict(FINETUNE_TINY["optim"], weight_decay=1e-4))

ADAPT = {
    "source": {"source": "digits", "image_size": 16, "hflip": 0.0, "label_fraction": 0.25},
    "target": {"image_size": 16, "hflip": 0.0},
    "model": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
    "adapt": {"bottleneck_dim": 16, "discriminator_hidden": 16},
    "optim": {"lr": 0.05},
    "schedule": {"epochs": 3, "warmup_epochs": 0.5},  # the last epoch is the one selected
    "run": {"batch_size": 32, "eval_batch_size": 128, "progress": False, "log_every": 1},
}


@pytest.mark.slow
@pytest.mark.exhaustive  # the DeepSpeed-vs-DDP matrix: make test-all (README, Development)
def test_finetune_zero3_matches_ddp(tmp_path, monkeypatch):
    preset, ddp = ddp_reference("finetune", FINETUNE, tmp_path)
    without_use_cpu(monkeypatch)
    z3 = tmp_path / "zero3"
    args = ["--config", str(preset), "--output-dir", str(z3)]
    run_recipe("finetune", args, launcher_args=zero_config_args("finetune", args, 3, free_port(),
                                                                stage3_param_persistence_threshold=0))
    ref = results(ddp)
    for run_dir in (z3,):
        for stage in ("source", "probe", "finetune", "scratch"):
            w = assert_same_weights(ddp / "models" / stage / "model.safetensors",
                                    run_dir / "models" / stage / "model.safetensors", label=f"{run_dir.name}/{stage}")
        got = results(run_dir)
        for k in ("target_acc", "linear_probe_acc", "scratch_target_acc", "selected_epoch", "trainable_params",
                  "params"):
            assert got[k] == ref[k], k
    assert any(k.startswith("stem.") for k in w) and ref["trainable_params"] < ref["params"]  # the stem was frozen


@pytest.mark.slow
@pytest.mark.exhaustive  # the DeepSpeed-vs-DDP matrix: make test-all (README, Development)
def test_dann_zero3_with_resume_matches_ddp(tmp_path, monkeypatch):
    preset, ddp = ddp_reference("adapt", dict(ADAPT, method="dann"), tmp_path)
    base = ["--config", str(preset)]
    without_use_cpu(monkeypatch)
    z3 = tmp_path / "zero3"
    args = base + ["--output-dir", str(z3)]
    launch = zero_config_args("adapt", args, 3, free_port(), stage3_param_persistence_threshold=0)
    run_recipe("adapt", args + ["--run.stop-after-steps", "6"], launcher_args=launch)  # 4 steps per epoch
    assert not (z3 / "results.json").exists()
    run_recipe("adapt", args + ["--resume", "latest"], launcher_args=launch)
    ref = results(ddp)
    assert ref["selected_epoch"] == 3  # the exported weights are those after the resumed epochs
    w = assert_same_weights(ddp / "models" / "adapt" / "model.safetensors", z3 / "models" / "adapt" / "model.safetensors",
                            label=z3.name)
    got = results(z3)
    for k in ("target_acc", "source_val_acc", "source_test_acc", "selected_epoch", "oracle_target_acc"):
        assert got[k] == ref[k], k
    assert any(k.startswith("discriminator.") for k in w)


def test_finetune_refuses_what_deepspeed_cannot_do():
    from visrep.engine import ConfigError, from_dict

    recipe = load_recipe("finetune")
    cfg = lambda **ft: from_dict(recipe.FinetuneRecipeConfig, dict(FINETUNE, finetune=dict(FINETUNE["finetune"], **ft)))  # noqa: E731
    gradual, l2sp = cfg(strategy="gradual"), cfg(l2sp_alpha=0.01)
    for stage in (1, 2, 3):
        with pytest.raises(ConfigError, match="--finetune.strategy lp_ft"):
            recipe.refuse_under_deepspeed(gradual, fake_accelerator(stage))
    with pytest.raises(ConfigError, match="--finetune.l2sp-alpha 0"):
        recipe.refuse_under_deepspeed(l2sp, fake_accelerator(3))
    for stage in (None, 2):  # L2-SP: whole parameters under DDP and ZeRO-1/2
        recipe.refuse_under_deepspeed(l2sp, fake_accelerator(stage))
    recipe.refuse_under_deepspeed(gradual, fake_accelerator(None))
