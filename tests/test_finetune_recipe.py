"""recipes/finetune.py end to end: source -> LP-FT with a frozen stem -> scratch baseline; a start from an
exported model with gradual unfreezing in 2 processes; a BYOL-style backbone state dict."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_recipe, straight_and_stopped

TINY = {
    "init": {"source": "train", "model": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
             "train_epochs": 1},
    "source_data": {"source": "digits", "image_size": 16, "hflip": 0.0, "label_fraction": 0.25},
    "target_domain": "digits_m",
    "data": {"image_size": 16, "hflip": 0.0, "label_fraction": 0.3},
    "finetune": {"strategy": "lp_ft", "freeze": {"mode": "first_n", "first_n": 1}, "layer_decay": 0.5,
                 "lp_epochs": 1, "l2sp_alpha": 0.01, "l2sp_beta": 0.001},
    "optim": {"lr": 0.02, "weight_decay": 0.0},
    "schedule": {"epochs": 2, "warmup_epochs": 0.5},
    "compare_scratch": True,
    "run": {"batch_size": 32, "eval_batch_size": 128, "progress": False, "log_every": 1},
}


@pytest.mark.slow
def test_lp_ft_keeps_frozen_stem_bitwise_and_reports(tiny, tmp_path):
    a = tmp_path / "a"
    run_recipe("finetune", ["--config", str(tiny), "--output-dir", str(a)])
    r = json.loads((a / "results.json").read_text())
    for k in ("target_acc", "source_val_acc", "linear_probe_acc", "scratch_target_acc", "target_val_acc"):
        assert 0.0 <= r[k] <= 1.0, k
    assert r["method"] == "lp_ft" and r["train_labels"] == 378 and r["num_processes"] == 1
    probe, ft = (load_file(str(a / "models" / s / "model.safetensors")) for s in ("probe", "finetune"))
    source = load_file(str(a / "models" / "source" / "model.safetensors"))
    for k in probe:
        if k.startswith("stem."):  # frozen in both stages: weights and BN running statistics bitwise equal
            assert torch.equal(probe[k], ft[k]) and torch.equal(source[k], ft[k]), k
        elif k.startswith("stages."):  # frozen in the probe only
            assert torch.equal(probe[k], source[k]), k
    assert any(not torch.equal(probe[k], ft[k]) for k in probe if k.startswith("stages.2"))
    assert any(not torch.equal(probe[k], ft[k]) for k in probe if k.endswith("running_mean") and "stages" in k)

    # ---- from the exported source model, gradual unfreezing, 2 processes -------------------------
    b = tmp_path / "b"
    run_recipe("finetune", ["--config", str(tiny), "--output-dir", str(b), "--init.source", "export",
                            "--init.path", str(a / "models" / "source"), "--finetune.strategy", "gradual",
                            "--finetune.unfreeze-every", "1", "--finetune.freeze.mode", "none",
                            "--compare-scratch", "False"], processes=2)
    rb = json.loads((b / "results.json").read_text())
    assert rb["num_processes"] == 2 and rb["method"] == "gradual" and rb["source_val_acc"] is None
    recs = [json.loads(l) for l in (b / "metrics.jsonl").read_text().splitlines()]
    assert [x["trainable_from_stage"] for x in recs if "trainable_from_stage" in x] == [4, 3]
    start, end = load_file(str(a / "models" / "source" / "model.safetensors")), \
        load_file(str(b / "models" / "finetune" / "model.safetensors"))
    for k in start:  # stem, stages.0 and stages.1 were never unfrozen in 2 epochs
        if k.startswith(("stem.", "stages.0.", "stages.1.")):
            assert torch.equal(start[k], end[k]), k


@pytest.mark.slow
def test_start_from_a_backbone_state_dict(tiny, tmp_path):
    from visrep.zoo import create_backbone

    net = create_backbone("resnet20", num_classes=0, small_input=True, width=0.25)
    f = tmp_path / "byol_backbone.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(f))
    out = tmp_path / "c"
    run_recipe("finetune", ["--config", str(tiny), "--output-dir", str(out), "--init.source", "safetensors",
                            "--init.path", str(f), "--finetune.strategy", "linear_probe", "--compare-scratch", "False"])
    r = json.loads((out / "results.json").read_text())
    assert r["method"] == "linear_probe" and r["init"] == str(f)
    probe = load_file(str(out / "models" / "probe" / "model.safetensors"))
    for k, v in net.state_dict().items():
        assert torch.equal(probe[k], v), k  # the frozen backbone is exactly the loaded one
    p = run_recipe("finetune", ["--config", str(tiny), "--init.source", "export"], check=False)
    assert p.returncode != 0 and "init.path" in p.stderr


@pytest.mark.slow
def test_gradual_l2sp_resume_mid_stage_equals_straight_run(tiny, tmp_path):
    args = ["--config", str(tiny), "--init.source", "scratch", "--finetune.strategy", "gradual",
            "--finetune.unfreeze-every", "1", "--compare-scratch", "False", "--schedule.epochs", "3"]
    # 378 labels -> 11 batches of 32 per epoch: stop in epoch 2 (one stage unfrozen), then resume
    a, b = straight_and_stopped("finetune", args, tmp_path, 15)
    ckpt = b / "checkpoints" / "finetune" / "step_00000015"
    assert torch.load(ckpt / "extra_unfreeze.pt", weights_only=True)["epoch"] == 1
    assert (ckpt / "extra_l2sp.pt").is_file()
    run_recipe("finetune", [*args, "--output-dir", str(b), "--resume", "latest"])
    wa, wb = (load_file(str(d / "models" / "finetune" / "model.safetensors")) for d in (a, b))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["target_acc"] == rb["target_acc"] and ra["target_val_acc"] == rb["target_val_acc"]
