"""recipes/adapt.py end to end: exact resume (GRL progress in the checkpoint), 2 processes, honest results."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import results, run_recipe, straight_and_stopped

TINY = {
    "source": {"source": "digits", "image_size": 16, "hflip": 0.0, "label_fraction": 0.25},
    "target_domain": "digits_m",
    "target": {"image_size": 16, "hflip": 0.0},
    "model": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
    "adapt": {"bottleneck_dim": 16, "discriminator_hidden": 16, "mmd_weight": 1.0, "coral_weight": 10.0},
    "optim": {"lr": 0.05},
    "schedule": {"epochs": 2, "warmup_epochs": 0.5},
    "run": {"batch_size": 32, "eval_batch_size": 128, "progress": False, "log_every": 1},
}


@pytest.mark.slow
def test_dann_resume_mid_epoch_equals_straight_run(tiny, tmp_path):
    # 314 source images -> 9 batches of 32 per epoch, 18 steps: stop in the middle of epoch 2
    a, b = straight_and_stopped("adapt", ["--config", str(tiny), "--method", "dann"], tmp_path, 13)
    ckpt = b / "checkpoints" / "adapt" / "step_00000013"
    grl = torch.load(ckpt / "extra_grl.pt", weights_only=True)
    assert grl == {"num_steps": 13, "total_steps": 18}
    assert torch.load(ckpt / "extra_best.pt", weights_only=True)["best_epoch"] == 1
    run_recipe("adapt", ["--config", str(tiny), "--method", "dann", "--output-dir", str(b), "--resume", "latest"])
    wa, wb = (load_file(str(d / "models" / "adapt" / "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and any(k.startswith("discriminator.") for k in wa)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    ra, rb = results(a), results(b)
    for k in ("target_acc", "source_val_acc", "source_test_acc", "selected_epoch", "target_acc_last_epoch",
              "oracle_target_acc"):
        assert ra[k] == rb[k], k
    assert ra["method"] == "dann" and 0 <= ra["target_acc"] <= 1 and 0 < ra["source_val_acc"] <= 1
    recs = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "train/disc_acc" in r]
    assert len(steps) == 18 and all(0 <= r["train/disc_acc"] <= 1 for r in steps)
    lams = [r["train/grl_lambda"] for r in steps]
    assert lams[0] == 0.0 and lams == sorted(lams) and lams[-1] > 0.99
    assert [r["stage_step"] for r in recs if "train/grl_lambda" in r] == list(range(1, 19))

    from visrep.transfer.adapt import load_adaptation_model

    model, cfg = load_adaptation_model(a / "models" / "adapt")
    assert cfg["method"] == "dann" and model.discriminator is not None


@pytest.mark.slow
def test_cdan_e_two_processes_and_source_only(tiny, tmp_path):
    """The one 2-process launch runs CDAN+E: DDP over a discriminator behind the GRL, entropy weights normalised
    over the gathered batch (sync=gather). MMD's gathered sum is checked in 2 processes at the loss level
    (test_distributed_ops.py); its recipe branch is CORAL's (test_shards.py)."""
    out = tmp_path / "ddp"
    run_recipe("adapt", ["--config", str(tiny), "--method", "cdan_e", "--output-dir", str(out)], processes=2)
    r = results(out)
    assert r["num_processes"] == 2 and r["method"] == "cdan_e"
    state = json.loads((out / "state.json").read_text())
    assert state["stages"]["adapt"]["steps"] == 8  # 9 global batches of 32 over 2 ranks -> 4 per epoch
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "train/transfer_loss" in x]
    assert len(steps) == 8, "main process logs once per step"
    assert all(0 <= x["train/disc_acc"] <= 1 and x["train/transfer_loss"] > 0 for x in steps)
    lams = [x["train/grl_lambda"] for x in steps]
    assert lams[0] == 0.0 and lams == sorted(lams) and lams[-1] > lams[0]
    for k in ("target_acc", "source_val_acc", "oracle_target_acc"):
        assert 0.0 <= r[k] <= 1.0
    from visrep.transfer.adapt import load_adaptation_model

    model, cfg = load_adaptation_model(out / "models" / "adapt")
    assert cfg["method"] == "cdan_e" and cfg["condition"] == "auto"
    assert model.discriminator[0].in_features == 16 * 10  # the full map f (x) g of the 16-wide bottleneck
    so = tmp_path / "so"
    run_recipe("adapt", ["--config", str(tiny), "--method", "source_only", "--schedule.epochs", "1",
                         "--output-dir", str(so)])
    assert results(so)["method"] == "source_only"
    p = run_recipe("adapt", ["--config", str(tiny), "--method", "mmdd"], check=False)
    assert p.returncode != 0 and "coral" in p.stderr
    p = run_recipe("adapt", ["--config", str(tiny), "--target.label-fraction", "0.5",
                             "--output-dir", str(tmp_path / "x")], check=False)
    assert p.returncode != 0 and "target.label_fraction" in p.stderr
