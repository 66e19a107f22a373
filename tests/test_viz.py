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


# ----------------------------------------------------------------------------- CAM methods (grad-cam package)

import sys  # noqa: E402

import pytest  # noqa: E402

from visrep.errors import is_user_error  # noqa: E402
from visrep.zoo.viz import CAM_METHODS, CamError, UnknownLayerError, cam_method, default_cam_layer  # noqa: E402


class _TinyNet(torch.nn.Module):
    """conv (stride 2) -> in-place ReLU -> pooled linear head; ``body`` is the explained layer. The
    in-place ReLU right after it checks that the CAM sees the layer's output, not its rectified copy."""

    def __init__(self, classes=4):
        super().__init__()
        self.body = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.act = torch.nn.ReLU(inplace=True)
        self.head = torch.nn.Linear(6, classes)
        self.num_classes = classes

    def forward(self, x):
        return self.head(self.act(self.body(x)).mean((2, 3)))


def _minmax(t):
    lo, hi = t.flatten(1).amin(1)[:, None, None], t.flatten(1).amax(1)[:, None, None]
    return (t - lo) / (hi - lo + 1e-7)


def _hand_gradcam(model, x, target, margin=False):
    """relu(sum_k mean_hw(d score / d A_k) A_k), scaled to [0, 1], bilinear to the input, scaled again."""
    a = model.body(x).detach().requires_grad_(True)
    logits = model.head(F.relu(a).mean((2, 3)))
    score = logits.gather(1, target[:, None])[:, 0]
    if margin:
        score = score - logits.scatter(1, target[:, None], float("-inf")).amax(1)
    grad, = torch.autograd.grad(score.sum(), a)
    cam = F.relu((grad.mean((2, 3), keepdim=True) * a).sum(1)).detach()
    cam = F.interpolate(_minmax(cam)[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return _minmax(cam)


@pytest.mark.parametrize("score", ["logit", "margin"])
def test_package_gradcam_matches_hand_computation(score):
    torch.manual_seed(0)
    model = _TinyNet()
    x = torch.randn(3, 3, 12, 20)  # not square: catches an H/W mix-up in the resize
    target = torch.tensor([0, 2, 3])
    cam, t = grad_cam(model, x, target=target, layer="body", score=score)
    assert torch.equal(t, target) and cam.shape == (3, 12, 20)
    want = _hand_gradcam(model, x, target, margin=score == "margin")
    assert want.amax() > 0.99  # not a degenerate all-zero map
    torch.testing.assert_close(cam, want, atol=1e-4, rtol=0)
    cam_pred, t_pred = grad_cam(model, x, layer="body")  # default target: the predicted class
    assert torch.equal(t_pred, model(x).argmax(1))
    torch.testing.assert_close(cam_pred, _hand_gradcam(model, x, t_pred), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", list(CAM_METHODS))
def test_every_cam_method_on_a_zoo_model(method):
    torch.manual_seed(0)
    model = create_backbone("resnet20", num_classes=3, width=0.25)
    model.train()
    x = torch.randn(2, 3, 24, 32)
    layer = default_cam_layer(model)
    module = dict(model.named_modules())[layer]
    sentinel = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cam, target = grad_cam(model, x, target=1, method=method)
    assert cam.shape == (2, 24, 32) and cam.dtype == torch.float32
    assert torch.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    assert torch.equal(target, torch.tensor([1, 1]))
    # the model is left as it was: mode, parameter grads, weights and BN statistics, modules in place
    assert model.training
    assert all(p.grad is sentinel[n] for n, p in model.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert dict(model.named_modules())[layer] is module
    assert not module._forward_hooks


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "eigencam", "ablationcam"])
def test_cam_on_vit_tokens(method):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=3)
    assert default_cam_layer(model) == "blocks.1.norm1"  # the last block's output never reaches the class token
    cam, _ = grad_cam(model, torch.randn(1, 3, 64, 64), method=method)
    assert cam.shape == (1, 64, 64) and cam.min() >= 0 and cam.max() <= 1
    assert cam.amax() > 0.99  # gradients did reach the patch tokens


def test_cam_method_names_and_errors(tmp_path, capsys):
    assert cam_method("GradCAM++") == cam_method("grad-cam++") == "gradcam++"
    assert cam_method("Score_CAM") == "scorecam"
    model = create_backbone("resnet20", num_classes=3, width=0.25)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(CamError) as e:
        grad_cam(model, x, method="gradcam+++")
    assert is_user_error(e.value) and "\n" not in str(e.value)
    assert "unknown CAM method 'gradcam+++'" in str(e.value) and all(m in str(e.value) for m in CAM_METHODS)
    with pytest.raises(UnknownLayerError) as e:
        grad_cam(model, x, layer="stages.9")
    assert is_user_error(e.value) and "close: stages." in str(e.value)
    with pytest.raises(ValueError, match="num_classes > 0"):
        grad_cam(create_backbone("resnet20", num_classes=0), x)
    with pytest.raises(ValueError, match="score must be"):
        grad_cam(model, x, score="prob")
    # the CLI: one line on stderr, exit status 2, no traceback
    from PIL import Image
    Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / "img.png")
    capsys.readouterr()
    rc = main(["viz", "gradcam", "resnet20", "--image", str(tmp_path / "img.png"), "--method", "nope",
               "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"visrep: error: unknown CAM method 'nope'; choose one of: {', '.join(CAM_METHODS)}"]
    assert not (tmp_path / "x.png").exists()


def test_cli_gradcam_method(tmp_path, capsys):
    from PIL import Image

    from visrep.zoo.cli import CAM_METHOD_NAMES
    assert CAM_METHOD_NAMES == tuple(CAM_METHODS)  # the parser's list, kept free of a torch import
    with pytest.raises(SystemExit):
        main(["viz", "gradcam", "--help"])
    usage = capsys.readouterr().out
    assert "--method" in usage and all(m in usage for m in CAM_METHODS)
    Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / "img.png")
    rc = main(["viz", "gradcam", "resnet20", "--num-classes", "10", "--image", str(tmp_path / "img.png"),
               "--method", "gradcam++", "--layer", "stages.1", "--target-class", "2",
               "--out", str(tmp_path / "pp.png")])
    assert rc == 0 and (tmp_path / "pp.png").stat().st_size > 1000


def test_missing_grad_cam_package_is_a_user_error(monkeypatch):
    model = create_backbone("resnet20", num_classes=3, width=0.25)
    x = torch.randn(1, 3, 32, 32)
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    with pytest.raises(CamError, match=r"pip install 'grad-cam>=1\.5\.7'") as e:
        grad_cam(model, x)
    assert is_user_error(e.value)
    # an OpenCV that cannot load (opencv-python without libGL.so.1): point at the headless build
    for name in [m for m in sys.modules if m == "pytorch_grad_cam" or m.startswith("pytorch_grad_cam.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(CamError, match="opencv-python-headless"):
        grad_cam(model, x)


def test_zoo_import_stays_light():
    import subprocess
    code = ("import sys, visrep.zoo, visrep.zoo.viz, visrep.cli; visrep.cli.build_parser(); "
            "heavy = [m for m in ('pytorch_grad_cam', 'cv2', 'ttach') if m in sys.modules]; "
            "sys.exit(repr(heavy) if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
