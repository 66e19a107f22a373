"""recipes/clip.py end to end: exact resume, 2 processes with GradCache accumulation, distillation, errors."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_in_process, run_recipe, straight_and_stopped, write_preset

TINY = {
    "data": {"source": "digits", "image_size": 8, "hflip": 0.0, "val_fraction": 0.4, "test_fraction": 0.4},
    "model": {"image": {"source": "zoo", "name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
              "text": {"source": "small", "context_length": 12, "width": 32, "layers": 1, "heads": 2},
              "embed_dim": 16},
    "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.1, "betas": [0.9, 0.98]},
    "schedule": {"epochs": 2, "warmup_epochs": 0.5},
    "run": {"batch_size": 32, "eval_batch_size": 128, "progress": False, "log_every": 1},
}
KEYS = ("zero_shot_acc", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")


@pytest.mark.slow
def test_resume_mid_run_equals_straight_run_and_distill_from_it(tiny, tmp_path):
    # 360 train pairs / 32 -> 11 steps per epoch: stop in the middle of epoch 2
    a, b = straight_and_stopped("clip", ["--config", str(tiny)], tmp_path, 15)
    run_recipe("clip", ["--config", str(tiny), "--output-dir", str(b), "--resume", "latest"])
    wa, wb = (load_file(str(d / "models" / "clip" / "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and "logit_scale" in wa
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for k in KEYS:
        assert ra[k] == rb[k] and 0.0 <= ra[k] <= 1.0, k
    assert ra["num_processes"] == 1 and ra["logit_scale"] <= 100.0
    logged = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    scales = [r["train/logit_scale"] for r in logged if "train/logit_scale" in r]
    assert len(scales) == 22 and max(scales) <= 100.0 + 1e-4

    # CLIP-to-CLIP distillation from the finished run's export, 1 epoch
    kd = tmp_path / "kd"
    run_recipe("clip", ["--config", str(tiny), "--output-dir", str(kd), "--schedule.epochs", "1",
                        "--teacher.source", "checkpoint", "--teacher.checkpoint", str(a / "models" / "clip"),
                        "--teacher.kd-weight", "0.5", "--teacher.temperature", "2.0"])
    logged = [json.loads(l) for l in (kd / "metrics.jsonl").read_text().splitlines()]
    assert any("train/kd" in r and r["train/kd"] > 0 for r in logged)


@pytest.mark.slow
def test_two_processes_with_gradcache_accumulation(tiny, tmp_path):
    out = tmp_path / "ddp"
    run_recipe("clip", ["--config", str(tiny), "--output-dir", str(out), "--run.batch-size", "8",
                        "--run.grad-accum", "2", "--schedule.epochs", "1"], processes=2)
    res = json.loads((out / "results.json").read_text())
    assert res["num_processes"] == 2 and res["global_batch"] == 32 and all(k in res for k in KEYS)
    state = json.loads((out / "state.json").read_text())
    # 360 pairs in loader batches of 16 -> 22 batches, split over 2 ranks -> 11 steps
    assert state["stages"]["clip"]["steps"] == 11
    ckpt = out / "checkpoints" / "clip" / "step_00000011"
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert "grad_accum: 2" in (out / "config.yaml").read_text()


def test_bad_input_is_refused_with_the_key_named(tiny, tmp_path, capsys):
    p = run_in_process("clip", ["--config", str(tiny), "--clip.loss", "sigmoid", "--output-dir", str(tmp_path / "s")],
                       capsys)
    assert p.returncode == 2 and "model.init_logit_bias" in p.stderr and "Traceback" not in p.stderr
    bad = write_preset(tmp_path / "bad.yaml", {"clip": {"los": "infonce"}})
    p = run_in_process("clip", ["--config", str(bad)], capsys)
    assert p.returncode == 2 and "clip.los" in p.stderr and str(bad) in p.stderr
    p = run_in_process("clip", ["--config", str(tiny), "--teacher.source", "checkpoint"], capsys)
    assert p.returncode == 2 and "teacher.checkpoint" in p.stderr
