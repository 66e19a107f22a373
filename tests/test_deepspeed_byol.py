"""BYOL under DeepSpeed ZeRO-3 (CPU, gloo): the EMA target is updated correctly while the online and
target networks are sharded -- both for partitioned parameters (shard-local update of ``ds_tensor``)
and for ZeRO-3's small "persistent" parameters (kept whole in ``.data``) -- across a stop and resume,
so the weights equal those of the same run under DDP.
LARS is refused under ZeRO."""
import json

import pytest
import torch
from safetensors.torch import load_file

import helpers
from ds_helpers import fake_accelerator, load_recipe
from helpers import free_port, run_recipe, write_preset
from visrep.launch.accelerate_config import LaunchSpec, write_launch_files

pytest.importorskip("deepspeed")

TINY = {
    "data": {"source": "digits", "image_size": 16, "hflip": 0.0, "label_fraction": 0.25},
    "model": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
    "byol": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32, "base_tau": 0.99},
    "augment": {"crop_scale": [0.3, 1.0], "hflip": 0.0},
    "optim": {"name": "sgd", "lr": 1.0, "weight_decay": 1e-5},
    "schedule": {"epochs": 2, "warmup_epochs": 0.5},
    "eval": {"knn_k": 10, "linear_epochs": 5, "every_epochs": 2},
    "run": {"batch_size": 32, "eval_batch_size": 128, "progress": False, "log_every": 1},
}


def weights(run_dir):
    return load_file(str(run_dir / "models" / "byol" / "model.safetensors"))


@pytest.mark.slow
def test_zero2_and_zero3_byol_equal_ddp_with_a_zero3_resume(tmp_path, monkeypatch):
    preset = write_preset(tmp_path / "tiny.yaml", TINY)
    ddp = tmp_path / "ddp"
    run_recipe("byol", ["--config", str(preset), "--output-dir", str(ddp)], processes=2)

    monkeypatch.setattr(helpers, "env", lambda: {k: v for k, v in helpers._base_env().items()
                                                 if k != "ACCELERATE_USE_CPU"})
    # every parameter partitioned (persistence threshold 0): the shard-local EMA path; stop, resume
    z3 = tmp_path / "zero3"
    args = ["--config", str(preset), "--output-dir", str(z3)]
    files = write_launch_files(LaunchSpec("byol", list(args), gpus_per_node=2, deepspeed="zero3", cpu=True,
                                          main_process_port=free_port()))
    ds = json.loads(files["deepspeed"].read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    files["deepspeed"].write_text(json.dumps(ds))
    launch = ["--config_file", str(files["accelerate_config"])]
    run_recipe("byol", args + ["--run.stop-after-steps", "5"], launcher_args=launch)
    run_recipe("byol", args + ["--resume", "latest"], launcher_args=launch)
    # ZeRO-3 defaults (--zero_stage 3): these small parameters are all "persistent", kept whole
    z3p = tmp_path / "zero3_persistent"
    run_recipe("byol", ["--config", str(preset), "--output-dir", str(z3p)],
               launcher_args=["--use_deepspeed", "--zero_stage", "3", "--num_processes", "2",
                              "--mixed_precision", "no", "--main_process_port", str(free_port())])
    # (ZeRO-2 keeps parameters whole, so the EMA takes the same path as for the persistent parameters above
    # and under DDP; ZeRO-2 itself is compared with DDP in the distillation, CLIP and fine-tuning recipes.)
    ref = weights(ddp)
    assert any(k.startswith("target_backbone.") for k in ref)
    for run_dir in (z3, z3p):
        got = weights(run_dir)
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=f"{run_dir.name}: {k}")
        res, ref_res = (json.loads((d / "results.json").read_text()) for d in (run_dir, ddp))
        # the same weights and, with rank 0's BatchNorm statistics on every rank, the same figures; the
        # SGD-trained linear probe may flip one test sample (the weights agree to 1e-6, not bitwise)
        for key in ("final_tau", "knn_acc"):
            assert res[key] == ref_res[key], (run_dir.name, key, res[key], ref_res[key])
        assert abs(res["linear_acc"] - ref_res["linear_acc"]) <= 1 / 100, (run_dir.name, res, ref_res)


def test_lars_is_refused_under_deepspeed():
    from visrep.engine import ConfigError, from_dict

    recipe = load_recipe("byol")
    lars, sgd = (from_dict(recipe.BYOLRecipeConfig, dict(TINY, optim=dict(TINY["optim"], name=n))) for n in ("lars", "sgd"))
    for stage in (1, 2, 3):
        with pytest.raises(ConfigError, match="optim.name 'lars'.*--optim.name sgd"):
            recipe.refuse_under_deepspeed(lars, fake_accelerator(stage))
        recipe.refuse_under_deepspeed(sgd, fake_accelerator(stage))
    recipe.refuse_under_deepspeed(lars, fake_accelerator(None))  # LARS under DDP
