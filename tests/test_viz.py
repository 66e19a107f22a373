"""Grad-CAM on a planted task, feature grids, ViT attention, and the visrep CLI."""
import torch
import torch.nn.functional as F

from visrep.cli import main
from visrep.zoo import create_backbone
from visrep.zoo.viz import (attention_rollout, grad_cam, prepare_input, save_attention, save_feature_grid,
                            save_gradcam, vit_attention)

S = 48  # image side; the planted region is the top-left quadrant


def _planted_batch(n, g):
    """Noise images; class 1 has an 8x8 striped patch (zero mean, random orientation) inside the
    top-left quadrant, class 0 has none. Only that region carries the label."""
    x = torch.randn(n, 3, S, S, generator=g) * 0.2
    y = torch.randint(0, 2, (n,), generator=g)
    vert = torch.tensor([1.0, -1.0]).repeat(4)[None, :].expand(8, 8)
    for i in range(n):
        if y[i] == 1:
            r, c = torch.randint(4, S // 2 - 8 - 3, (2,), generator=g).tolist()  # well inside the quadrant
            x[i, :, r:r + 8, c:c + 8] += 1.5 * (vert if torch.rand(1, generator=g) < 0.5 else vert.t())
    return x, y


@torch.no_grad()
def _recalibrate_bn(model, g, batches=4):
    """Exact BN statistics of the current weights (few-step training leaves the running ones stale)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    for _ in range(batches):
        model(_planted_batch(64, g)[0])


def test_gradcam_finds_planted_region():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = create_backbone("resnet20", num_classes=2, width=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_val, y_val = _planted_batch(64, g)
    for step in range(1, 121):
        x, y = _planted_batch(32, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            _recalibrate_bn(model, g)
            model.eval()
            with torch.no_grad():
                acc = (model(x_val).argmax(1) == y_val).float().mean()
            model.train()
            if acc > 0.95:
                break
    x, y = x_val, y_val
    model.eval()
    assert (model(x).argmax(1) == y).float().mean() > 0.9
    x = x[y == 1]
    cam, target = grad_cam(model, x, target=1)
    assert cam.shape == (len(x), S, S) and cam.min() >= 0 and cam.max() <= 1
    frac = cam[:, : S // 2, : S // 2].sum((1, 2)) / cam.sum((1, 2))
    assert frac.mean() > 0.6, frac.mean()  # a quarter of the image holds most of the mass (chance: 0.25)


def test_gradcam_png_and_cli(tmp_path):
    from PIL import Image
    img = (torch.rand(40, 56, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(img).save(tmp_path / "img.png")
    model = create_backbone("resnet20", num_classes=10)
    x, disp = prepare_input(model, tmp_path / "img.png")
    assert x.shape == (1, 3, 32, 32) and disp.shape == (32, 32, 3)
    out = save_gradcam(model, x, disp, tmp_path / "cam.png", target=3)
    assert out.stat().st_size > 1000
    rc = main(["viz", "gradcam", "resnet20", "--num-classes", "10", "--image", str(tmp_path / "img.png"),
               "--out", str(tmp_path / "cli_cam.png")])
    assert rc == 0 and (tmp_path / "cli_cam.png").stat().st_size > 1000


def test_feature_grid(tmp_path):
    model = create_backbone("resnet20")
    x, _ = prepare_input(model)
    out = save_feature_grid(model, x, tmp_path / "feat.png", layer="stages.1", max_channels=8)
    assert out.stat().st_size > 1000
    assert main(["viz", "features", "mobilenetv2_050", "--small-input", "--out", str(tmp_path / "f2.png")]) == 0
    assert (tmp_path / "f2.png").exists()


def test_vit_attention(tmp_path):
    model = create_backbone("vit_tiny_patch16_224", img_size=64, depth=2)
    x = torch.randn(1, 3, 64, 64)
    attn = vit_attention(model, x)
    assert len(attn) == 2 and attn[0].shape == (1, 3, 17, 17)
    assert torch.allclose(attn[0].sum(-1), torch.ones(1, 3, 17))
    roll = attention_rollout(attn)
    assert roll.shape == (1, 16) and (roll >= 0).all()
    assert all(b.attn.fused_attn == getattr(b.attn, "fused_attn") for b in model.blocks)
    disp = torch.rand(64, 64, 3)
    assert save_attention(model, x, disp, tmp_path / "attn.png").stat().st_size > 1000
    assert main(["viz", "attention", "vit_tiny_patch16_224", "--out", str(tmp_path / "a2.png")]) == 0


def test_zoo_cli_list_and_summary(capsys):
    assert main(["zoo", "list", "resnet2*"]) == 0
    assert capsys.readouterr().out.split() == ["resnet20"]
    assert main(["zoo", "list", "-v", "googlenet"]) == 0
    assert "1409.4842" in capsys.readouterr().out
    assert main(["zoo", "list", "no_such_net"]) == 1
    assert main(["zoo", "summary", "resnet50", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "25,557,032" in out and "4.09 G per image" in out
    assert main(["zoo", "summary", "resnet20", "--input-size", "3", "32", "32", "--batch-size", "128"]) == 0
    assert "batch 128" in capsys.readouterr().out


def test_cli_structure(capsys):
    import pytest
    from visrep.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"zoo", "viz"} <= set(sub.choices)
    assert main(["zoo"]) == 2 and "summary" in capsys.readouterr().out
    assert main(["viz"]) == 2 and "gradcam" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
