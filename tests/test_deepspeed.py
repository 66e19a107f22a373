"""DeepSpeed ZeRO on CPU (gloo): Accelerate and DeepSpeed agree on the world size, and a recipe
trained under ZeRO-2 / ZeRO-3 -- including a ZeRO-3 stop and resume -- ends with exactly the weights
of the same run under plain DDP."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_recipe, write_preset

pytest.importorskip("deepspeed")

TINY = {
    "data": {"source": "digits", "image_size": 16, "hflip": 0.0, "label_fraction": 0.25},
    "teacher": {"source": "train", "model": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.5}},
                "train_epochs": 1, "optim": {"lr": 0.05}},
    "student": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
    "optim": {"lr": 0.05},
    "schedule": {"epochs": 2, "warmup_epochs": 0.5},
    "run": {"batch_size": 32, "eval_batch_size": 128, "progress": False, "log_every": 1},
}


def deepspeed_args(stage: int, port: int) -> list[str]:
    return ["--use_deepspeed", "--num_processes", "2", "--zero_stage", str(stage), "--mixed_precision", "no",
            "--main_process_port", str(port)]


def same_weights(a, b):
    for stage in ("teacher", "scratch", "kd"):
        wa = load_file(str(a / "models" / stage / "model.safetensors"))
        wb = load_file(str(b / "models" / stage / "model.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=f"{stage}/{k}")


@pytest.mark.slow
def test_zero2_and_zero3_with_resume_match_ddp(tmp_path, monkeypatch):
    preset = write_preset(tmp_path / "tiny.yaml", TINY)
    ddp = tmp_path / "ddp"
    run_recipe("distill", ["--config", str(preset), "--output-dir", str(ddp)], processes=2)

    # ACCELERATE_USE_CPU would switch DeepSpeed off: the DeepSpeed runs go without it.
    monkeypatch.setattr("helpers.env", lambda: {k: v for k, v in __import__("helpers")._base_env().items()
                                                if k != "ACCELERATE_USE_CPU"})
    z2 = tmp_path / "zero2"
    run_recipe("distill", ["--config", str(preset), "--output-dir", str(z2)], launcher_args=deepspeed_args(2, 29631))
    ckpt = sorted((z2 / "checkpoints" / "kd").iterdir())[-1]
    assert (ckpt / "pytorch_model").is_dir(), "a DeepSpeed checkpoint (sharded engine state) was expected"
    assert json.loads((z2 / "results.json").read_text())["num_processes"] == 2
    same_weights(ddp, z2)

    z3 = tmp_path / "zero3"
    args = ["--config", str(preset), "--output-dir", str(z3)]
    run_recipe("distill", args + ["--run.stop-after-steps", "6"], launcher_args=deepspeed_args(3, 29632))
    assert not (z3 / "results.json").exists()
    run_recipe("distill", args + ["--resume", "latest"], launcher_args=deepspeed_args(3, 29633))
    res = json.loads((z3 / "results.json").read_text())
    assert res["student_params"] == json.loads((ddp / "results.json").read_text())["student_params"] > 0
    same_weights(ddp, z3)


@pytest.mark.slow
def test_clip_refuses_deepspeed_with_a_clear_error(tmp_path, monkeypatch):
    import helpers

    monkeypatch.setattr(helpers, "env", lambda: {k: v for k, v in helpers._base_env().items()
                                                 if k != "ACCELERATE_USE_CPU"})
    p = run_recipe("clip", ["--output-dir", str(tmp_path / "clip"), "--schedule.epochs", "1"],
                   launcher_args=deepspeed_args(2, 29634), check=False)
    assert p.returncode != 0 and "does not run under DeepSpeed yet" in p.stderr and "--multi_gpu" in p.stderr
