"""BYOL under DeepSpeed ZeRO-3 (CPU, gloo): the EMA target is updated correctly while the online and
target networks are sharded -- both for partitioned parameters (shard-local update of ``ds_tensor``)
and for ZeRO-3's small "persistent" parameters (kept whole in ``.data``), in one run whose persistence
threshold splits the model -- across a stop and resume, so the weights equal those of the same run
under DDP.
LARS is refused under ZeRO."""
import pytest
import torch
from safetensors.torch import load_file

from ds_helpers import fake_accelerator, load_recipe, without_use_cpu, zero_config_args
from helpers import ddp_reference, free_port, results, run_recipe
from test_byol_recipe import TINY as BYOL_TINY

pytest.importorskip("deepspeed")

# the BYOL test's preset with SGD (LARS is refused under ZeRO) and one evaluation at the end
TINY = dict(BYOL_TINY, optim={"name": "sgd", "lr": 1.0, "weight_decay": 1e-5},
            eval=dict(BYOL_TINY["eval"], every_epochs=2))


def weights(run_dir):
    return load_file(str(run_dir / "models" / "byol" / "model.safetensors"))


PERSISTENCE = 300  # ZeRO-3 keeps parameters of at most this many elements whole ("persistent"), partitions the rest


@pytest.mark.slow
@pytest.mark.exhaustive  # the DeepSpeed-vs-DDP matrix: make test-all (README, Development)
def test_zero3_byol_equals_ddp_with_a_resume(tmp_path, monkeypatch):
    """One ZeRO-3 run whose persistence threshold splits the model: the large parameters partitioned (the
    shard-local EMA path), the small ones kept whole in ``.data`` (the path DDP and ZeRO-2 take); stopped
    after 5 steps and resumed, it ends with DDP's weights and figures."""
    preset, ddp = ddp_reference("byol", TINY, tmp_path)
    without_use_cpu(monkeypatch)
    z3 = tmp_path / "zero3"
    args = ["--config", str(preset), "--output-dir", str(z3)]
    launch = zero_config_args("byol", args, 3, free_port(), stage3_param_persistence_threshold=PERSISTENCE)
    run_recipe("byol", args + ["--run.stop-after-steps", "5"], launcher_args=launch)
    run_recipe("byol", args + ["--resume", "latest"], launcher_args=launch)
    ref, got = weights(ddp), weights(z3)
    trained = [v for k, v in ref.items() if v.is_floating_point() and "running_" not in k]
    assert {v.numel() <= PERSISTENCE for v in trained} == {True, False}, "the threshold must split the model"
    assert any(k.startswith("target_backbone.") for k in ref) and got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)
    res, ref_res = results(z3), results(ddp)
    # the same weights and, with rank 0's BatchNorm statistics on every rank, the same figures, up to a
    # near tie: the weights agree to 1e-6, not bitwise, so a kNN vote may flip one of the 270 test
    # digits (seen once in CI) and the SGD-trained linear probe a few
    assert res["final_tau"] == ref_res["final_tau"]
    assert abs(res["knn_acc"] - ref_res["knn_acc"]) <= 1.5 / 270, (res, ref_res)
    assert abs(res["linear_acc"] - ref_res["linear_acc"]) <= 1 / 100, (res, ref_res)


def test_lars_is_refused_under_deepspeed():
    from visrep.engine import ConfigError, from_dict

    recipe = load_recipe("byol")
    lars, sgd = (from_dict(recipe.BYOLRecipeConfig, dict(TINY, optim=dict(TINY["optim"], name=n))) for n in ("lars", "sgd"))
    for stage in (1, 2, 3):
        with pytest.raises(ConfigError, match="optim.name 'lars'.*--optim.name sgd"):
            recipe.refuse_under_deepspeed(lars, fake_accelerator(stage))
        recipe.refuse_under_deepspeed(sgd, fake_accelerator(stage))
    recipe.refuse_under_deepspeed(lars, fake_accelerator(None))  # LARS under DDP
