"""DeepSpeed ZeRO on CPU (gloo): Accelerate and DeepSpeed agree on the world size, and a recipe
trained under ZeRO-3 (with a stop and resume) or ZeRO-2 ends with exactly the weights of the same run
under plain DDP; the logit-scale clamp reaches DeepSpeed's fp32 master copy."""
import pytest

from ds_helpers import assert_same_weights, deepspeed_args, without_use_cpu, zero_config_args
from helpers import ddp_reference, free_port, results, run_recipe
from test_distill_recipe import TINY as DISTILL_TINY

pytest.importorskip("deepspeed")

# the distillation test's preset with 1-epoch stages: the ZeRO-3 stop at step 6 falls inside a stage
TINY = dict(DISTILL_TINY, teacher=dict(DISTILL_TINY["teacher"], train_epochs=1),
            schedule=dict(DISTILL_TINY["schedule"], epochs=1))


def same_weights(a, b):
    for stage in ("teacher", "scratch", "kd"):
        assert_same_weights(a / "models" / stage / "model.safetensors", b / "models" / stage / "model.safetensors",
                            label=stage)


@pytest.mark.slow
@pytest.mark.exhaustive  # the DeepSpeed-vs-DDP matrix: make test-all (README, Development)
def test_zero3_with_resume_matches_ddp(tmp_path, monkeypatch):
    """Distillation (three stages, each a new DeepSpeed engine; a frozen teacher outside the engine) under
    ZeRO-3, stopped inside a stage and resumed, ends with DDP's weights. (ZeRO-2 keeps parameters whole,
    the easier case: it is compared with DDP in the CLIP recipe, and every recipe runs under ZeRO-2 bf16 in
    tests/test_precision.py.)"""
    preset, ddp = ddp_reference("distill", TINY, tmp_path)
    without_use_cpu(monkeypatch)
    z3 = tmp_path / "zero3"
    args = ["--config", str(preset), "--output-dir", str(z3)]
    run_recipe("distill", args + ["--run.stop-after-steps", "6"], launcher_args=deepspeed_args(3, free_port()))
    assert not (z3 / "results.json").exists()
    run_recipe("distill", args + ["--resume", "latest"], launcher_args=deepspeed_args(3, free_port()))
    ckpt = sorted((z3 / "checkpoints" / "kd").iterdir())[-1]
    assert (ckpt / "pytorch_model").is_dir(), "a DeepSpeed checkpoint (sharded engine state) was expected"
    assert results(z3)["student_params"] == results(ddp)["student_params"] > 0
    assert results(z3)["num_processes"] == 2
    same_weights(ddp, z3)


@pytest.mark.slow
@pytest.mark.exhaustive  # the DeepSpeed-vs-DDP matrix: make test-all (README, Development)
def test_clip_zero2_and_zero3_match_ddp(tmp_path, monkeypatch):
    """The whole CLIP recipe (logit scale starting at its cap) under ZeRO-2, and under ZeRO-3 with every
    parameter partitioned (the attention's out_proj and the logit scale are then gathered outside their
    own module's forward; the scale is clamped on its shards) ends with DDP's weights (ZeRO-3 stop and
    resume is tested with the distillation, BYOL and DANN recipes). ZeRO-3 runs with memory_efficient_linear off: by default DeepSpeed swaps
    torch.nn.functional.linear for its own matmul + add, whose round-off leaves the weights ~6e-6 from
    DDP's after a few steps (with it off they are bit-identical)."""
    preset, ddp = ddp_reference("clip", {
        "data": {"source": "digits", "image_size": 8, "hflip": 0.0, "val_fraction": 0.4, "test_fraction": 0.4},
        "model": {"image": {"source": "zoo", "name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
                  "init_logit_scale": 4.605170185988092},
        "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.1},
        "schedule": {"epochs": 1, "warmup_epochs": 0.5},
        "run": {"batch_size": 32, "eval_batch_size": 128, "progress": False, "log_every": 1}}, tmp_path)
    without_use_cpu(monkeypatch)
    z2 = tmp_path / "zero2"
    run_recipe("clip", ["--config", str(preset), "--output-dir", str(z2)], launcher_args=deepspeed_args(2, free_port()))
    weights = "models/clip/model.safetensors"
    ref = assert_same_weights(ddp / weights, z2 / weights, label="zero2")
    assert float(ref["logit_scale"].max()) <= 4.605170185988092 + 1e-6

    z3 = tmp_path / "zero3"
    args = ["--config", str(preset), "--output-dir", str(z3)]
    launch = zero_config_args("clip", args, 3, free_port(), stage3_param_persistence_threshold=0,
                              memory_efficient_linear=False)
    run_recipe("clip", args, launcher_args=launch)
    assert_same_weights(ddp / weights, z3 / weights, label="zero3")
    res, res_ddp = results(z3), results(ddp)
    assert res["logit_scale"] == pytest.approx(res_ddp["logit_scale"], abs=1e-4) and res["num_processes"] == 2


@pytest.mark.slow
def test_logit_scale_clamp_reaches_deepspeed_master_weights(monkeypatch):
    """Under ZeRO-2 and ZeRO-3, in one 2-process launch (tests/ds_clamp_script.py)."""
    import subprocess

    import helpers
    from helpers import ACCELERATE_LAUNCH, ROOT

    e = {k: v for k, v in helpers._base_env().items() if k != "ACCELERATE_USE_CPU"}
    cmd = [*ACCELERATE_LAUNCH, *deepspeed_args(2, free_port()), str(ROOT / "tests" / "ds_clamp_script.py"), "2", "3"]
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    lines = {l.split()[0]: l.split() for l in p.stdout.splitlines() if l.startswith("FINAL")}
    assert p.returncode == 0 and lines.keys() == {"FINAL2", "FINAL3"}, p.stdout[-2000:] + p.stderr[-4000:]
    for stage, (_, final, _, expected) in lines.items():
        assert final == expected, f"{stage}: the clamp must act on DeepSpeed's fp32 master copy, not only on param.data"
