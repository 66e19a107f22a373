"""What the vision lectures teach, in the zoo: plain nets (no shortcuts), SE / CBAM in residual blocks,
receptive fields in the summary, Swin window attention maps, and timm ``hf-hub:`` weights from the cache."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from visrep.zoo import create_backbone
from visrep.zoo.blocks import CBAM, BasicBlock
from visrep.zoo.errors import PretrainedWeightsUnavailable
from visrep.zoo.receptive_field import receptive_fields
from visrep.zoo.summary import summarize
from visrep.zoo.testing import check_backbone_contract
from visrep.zoo.viz import save_attention, swin_attention, swin_window_attention


# ----------------------------------------------------------------------------- plain nets

def _zero_branches(model):
    for m in model.modules():
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
            nn.init.zeros_(m.bn2.bias)


def test_plain_net_has_no_identity_path():
    """With every residual branch zeroed, a ResNet is its shortcuts (option A: subsample + zero-pad the
    stem's output), while the plain net (He et al. 2015, Sec. 4.1) outputs exactly zero."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    plain, res = create_backbone("plain20").eval(), create_backbone("resnet20").eval()
    assert all(m.shortcut is None for m in plain.modules() if isinstance(m, BasicBlock))
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in res.parameters())
    _zero_branches(plain)
    _zero_branches(res)
    with torch.no_grad():
        assert torch.equal(plain.forward_features(x), torch.zeros(2, 64, 8, 8))
        stem = res.stem(x)[:, :, ::4, ::4]                 # two stride-2 subsamplings
        expected = F.pad(stem, (0, 0, 0, 0, 8 + 16, 8 + 16))  # 16 -> 32 -> 64 channels, zeros split evenly
        torch.testing.assert_close(res.forward_features(x), expected)
    check_backbone_contract(create_backbone("plain20", num_classes=3, width=0.5))
    assert create_backbone("resnet20", shortcut="none").stages[0][0].shortcut is None
    with pytest.raises(ValueError, match="zero_init_residual"):
        create_backbone("plain20", zero_init_residual=True)
    with pytest.raises(ValueError, match="shortcut"):
        BasicBlock(16, 16, shortcut="C")


TINY_TIMM = {"resnet18": dict(layers=(1, 1, 1, 1), channels=(8, 16, 16, 32), stem_width=8),
             "resnet50": dict(layers=(1, 1, 1, 1), channels=(4, 8, 8, 8), stem_width=8)}


@pytest.mark.parametrize("name", list(TINY_TIMM))
def test_timm_resnet_shortcut_none_is_the_plain_net(name):
    """timm's BasicBlock / Bottleneck with shortcut='none': the residual branch alone (no projection, no add),
    the contract unchanged, timm's zero-initialised last BN scale reset so that every block passes a signal."""
    kw = dict(TINY_TIMM[name], small_input=True, num_classes=3)
    torch.manual_seed(0)
    res = create_backbone(name, **kw).eval()
    torch.manual_seed(0)
    plain = create_backbone(name, shortcut="none", **kw).eval()
    assert plain.feature_info == res.feature_info
    gone = {k for k in res.state_dict() if ".downsample." in k}
    assert gone and plain.state_dict().keys() == res.state_dict().keys() - gone
    x = torch.randn(2, 3, 32, 32)
    blk = plain.layer2[0]  # stride 2, wider: the residual net projects its shortcut
    h = torch.randn(2, blk.conv1.in_channels, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(plain(x), res(x))
        pre = _pre_act(blk, h)  # the residual branch written out, before the block's last activation
        assert torch.equal(blk(h), F.relu(pre)) and blk.downsample is None
        ref = res.layer2[0]  # timm's own block with the same weights: the same branch plus the projected input
        ref.load_state_dict(blk.state_dict(), strict=False)
        torch.testing.assert_close(ref(h), F.relu(pre + ref.downsample(h)))
    plain.train()
    plain(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in plain.parameters())
    check_backbone_contract(plain, (3, 32, 32))


def _pre_act(blk, h):
    """A timm block's residual branch before its last activation."""
    if hasattr(blk, "conv3"):
        return blk.bn3(blk.conv3(F.relu(blk.bn2(blk.conv2(F.relu(blk.bn1(blk.conv1(h))))))))
    return blk.bn2(blk.conv2(F.relu(blk.bn1(blk.conv1(h)))))


def test_timm_shortcut_option_errors():
    with pytest.raises(ValueError, match=r"defined for timm ResNets .* 'test_vit' is a VisionTransformer"):
        create_backbone("timm:test_vit", shortcut="none")
    with pytest.raises(ValueError, match=r"shortcut='B' .* the only option is shortcut='none'"):
        create_backbone("resnet18", shortcut="B")
    with pytest.raises(ValueError, match="drop_path_rate=0.1 cannot be combined with shortcut='none'"):
        create_backbone("resnet18", shortcut="none", drop_path_rate=0.1)


# ----------------------------------------------------------------------------- SE and CBAM

def test_attention_parameter_counts():
    """BasicBlock(64, 64): two 3x3 convs 2 * 64*64*9 = 73,728 + two BNs 2 * 2*64 = 256 -> 73,984.
    SE, r = 16 (hidden 64/16 = 4, 1x1 convs with bias): 64*4 + 4 + 4*64 + 64 = 580 -> 74,564.
    CBAM, r = 16: shared MLP without bias 64*4 + 4*64 = 512, 7x7 conv 2->1 = 98, its BN 2 -> 74,596.
    C = 16 (r = 16 -> one hidden unit, the paper's C/r): SE adds 16*1 + 1 + 1*16 + 16 = 49."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(BasicBlock(64, 64)) == 73_984
    assert count(BasicBlock(64, 64, attention="se")) == 74_564
    assert count(BasicBlock(64, 64, attention="cbam")) == 74_596
    assert count(BasicBlock(16, 16, attention="se")) - count(BasicBlock(16, 16)) == 49
    with pytest.raises(ValueError, match="attention"):
        BasicBlock(16, 16, attention="eca")


def _naive_cbam(x, w0, w1, conv_w, bn):
    """Woo et al. 2018, Eq. 2-3 in float64: M_c = sigmoid(W1 relu(W0 avg) + W1 relu(W0 max)), F' = M_c * F;
    M_s = sigmoid(BN(f7x7([avg_c F'; max_c F']))), F'' = M_s * F' (the 7x7 conv as a sum over its 49 taps)."""
    avg, mx = x.mean((2, 3)), x.amax((2, 3))
    mc = torch.sigmoid(torch.relu(avg @ w0.T) @ w1.T + torch.relu(mx @ w0.T) @ w1.T)
    f1 = x * mc[:, :, None, None]
    s = torch.stack([f1.mean(1), f1.amax(1)], 1)
    sp = F.pad(s, (3, 3, 3, 3))
    h, w = x.shape[-2:]
    conv = sum(conv_w[0, c, i, j] * sp[:, c, i:i + h, j:j + w] for c in range(2) for i in range(7) for j in range(7))
    conv = (conv - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    return f1 * torch.sigmoid(conv)[:, None]


def test_cbam_and_se_placement_match_the_papers():
    torch.manual_seed(0)
    cbam = CBAM(32, reduction=8).double().eval()
    cbam.spatial.bn.running_mean.fill_(0.3)
    cbam.spatial.bn.running_var.fill_(2.0)
    x = torch.randn(2, 32, 6, 5, dtype=torch.float64)
    w0 = cbam.channel.mlp[0].weight[:, :, 0, 0]
    w1 = cbam.channel.mlp[2].weight[:, :, 0, 0]
    torch.testing.assert_close(cbam(x), _naive_cbam(x, w0, w1, cbam.spatial.conv.weight, cbam.spatial.bn))

    # SE-ResNet (Hu et al. Fig. 3): the gate scales the residual branch before the addition
    blk = BasicBlock(16, 16, attention="se").double().eval()
    for p in blk.parameters():
        nn.init.normal_(p, 0.5, 0.3)
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y = blk.bn2(blk.conv2(torch.relu(blk.bn1(blk.conv1(x)))))
        gate = torch.sigmoid(blk.attn.fc2(torch.relu(blk.attn.fc1(y.mean((2, 3), keepdim=True)))))
        torch.testing.assert_close(blk(x), torch.relu(y * gate + x))
    for att in ("se", "cbam"):
        m = create_backbone("resnet20", num_classes=3, width=0.5, attention=att)
        assert sum(isinstance(b.attn, nn.Identity) for b in m.modules() if isinstance(b, BasicBlock)) == 0
        check_backbone_contract(m)


# ----------------------------------------------------------------------------- receptive fields

class _SmallCNN(nn.Module):
    """conv3x3/1 | maxpool2/2, conv3x3/1 | conv5x5/2, conv3x3 dilation 2 (an effective 5x5)."""

    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU()),
            nn.Sequential(nn.MaxPool2d(2, 2), nn.Conv2d(4, 4, 3, 1, 1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(4, 4, 5, 2, 2), nn.ReLU6(), nn.Conv2d(4, 4, 3, 1, 2, dilation=2)))
        self.feature_info = [dict(num_chs=4, reduction=r, module=f"stages.{i}") for i, r in enumerate((1, 2, 4))]

    def forward_features(self, x):
        return self.stages(x)


def test_receptive_field_small_cnn():
    """r_out = r_in + (k - 1) * j_in, j_out = j_in * s:
    stage 0: conv3/1 -> r 3, j 1.  stage 1: pool2/2 -> r 3 + 1*1 = 4, j 2; conv3 -> 4 + 2*2 = 8.
    stage 2: conv5/2 -> 8 + 4*2 = 16, j 4; conv3 dilation 2 (k_eff 5) -> 16 + 4*4 = 32.
    The max-pool must not hide pixels (its gradient goes to one input), the ReLU6 must not saturate."""
    rfs = receptive_fields(_SmallCNN(), (3, 16, 16))
    assert [r["rf"] for r in rfs] == [(3, 3), (8, 8), (32, 32)]
    assert [r["stride"] for r in rfs] == [(1, 1), (2, 2), (4, 4)]
    assert not any(r["clipped"] for r in rfs)  # 32 > 16: grown past the default input


def test_receptive_field_resnet20_and_summary():
    """ResNet-20: stem conv3 -> 3. Stage 1: six 3x3 convs at jump 1 -> 3 + 6*2 = 15. Stage 2: the first conv
    has stride 2 (+2*1 = 17, jump 2), five more -> 17 + 5*2*2 = 37. Stage 3: +2*2 = 41 (jump 4), five more ->
    41 + 5*2*4 = 81. The option-A shortcut (subsampling) adds nothing: the longest path is the branches'."""
    want = [((3, 3), (1, 1)), ((15, 15), (1, 1)), ((37, 37), (2, 2)), ((81, 81), (4, 4))]
    for name in ("resnet20", "plain20"):  # the width does not change the field: a quarter keeps this fast
        rfs = receptive_fields(create_backbone(name, width=0.25))
        assert [(r["rf"], r["stride"]) for r in rfs] == want
        assert [r["reduction"] for r in rfs] == [1, 1, 2, 4] and not any(r["clipped"] for r in rfs)
    text = summarize(create_backbone("resnet20", width=0.25), (3, 32, 32), receptive_field=True).to_text()
    assert "receptive field" in text and any(line.startswith("stages.2") and line.rstrip().endswith("81x81")
                                             for line in text.splitlines())
    from visrep.cli import build_parser  # `visrep zoo summary NAME --receptive-field` adds the same table
    assert build_parser().parse_args(["zoo", "summary", "resnet20", "--receptive-field"]).receptive_field
    vit = create_backbone("vit_tiny_patch16_224", img_size=32, depth=2)
    assert all(r["clipped"] and r["rf"] == (32, 32) for r in receptive_fields(vit))  # global attention


# ----------------------------------------------------------------------------- Swin attention

def _tiny_swin(depths=(1, 1, 1, 1)):
    torch.manual_seed(0)
    return create_backbone("swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=24,
                           depths=depths, num_heads=(1, 1, 2, 2)).eval()


def _window_sums(m, w):
    n, h, c, wd = m.shape
    return m.reshape(n, h, c // w, w, wd // w, w).sum((3, 5))


def test_swin_attention_last_block_and_first_stage(tmp_path):
    model = _tiny_swin()
    x = torch.randn(2, 3, 64, 64)
    last = swin_attention(model, x)  # last stage: 64 / 32 = 2x2 tokens, 2 heads, one (clamped) window
    assert last.shape == (2, 2, 2, 2)
    torch.testing.assert_close(last.sum((2, 3)), torch.ones(2, 2))
    first = swin_attention(model, x, block="layers.0.blocks.0")  # 16x16 tokens, 4x4 windows, no shift
    assert first.shape == (2, 1, 16, 16)
    torch.testing.assert_close(_window_sums(first, 4), torch.ones(2, 1, 4, 4))
    assert save_attention(model, x[:1], torch.rand(64, 64, 3), tmp_path / "swin.png").stat().st_size > 1000


def test_swin_shifted_window_attention_matches_naive_reassembly():
    """Block 1 of stage 0 is shifted by 2: window k of timm's rolled grid holds tokens whose rolled position
    (p - 2) mod 16 falls in it. Rebuild the map token by token from the raw window attention and compare."""
    model = _tiny_swin(depths=(2, 1, 1, 1))
    x = torch.randn(1, 3, 64, 64)
    got = swin_attention(model, x, block="layers.0.blocks.1")
    attn, (h, w), (ws, _), (shift, _) = swin_window_attention(model, x, block="layers.0.blocks.1")
    assert (h, w, ws, shift) == (16, 16, 4, 2)
    naive = torch.zeros(1, 1, h, w, dtype=torch.float64)
    a = attn.double()
    for k in range(a.shape[0]):
        wi, wj = divmod(k, w // ws)
        for t in range(ws * ws):
            r, c = divmod(t, ws)
            i, j = (wi * ws + r + shift) % h, (wj * ws + c + shift) % w  # undo the cyclic shift
            naive[0, :, i, j] = a[k, :, :, t].mean(-1)
    torch.testing.assert_close(got.double(), naive)
    rolled = torch.roll(got, shifts=(-shift, -shift), dims=(2, 3))
    torch.testing.assert_close(_window_sums(rolled, 4), torch.ones(1, 1, 4, 4))
    assert not torch.allclose(_window_sums(got, 4), torch.ones(1, 1, 4, 4))  # the shift matters


# ----------------------------------------------------------------------------- timm hf-hub weights

def _hf_cache(root, repo, folder_files):
    """huggingface_hub's cache layout: models--ORG--NAME/{refs/main, snapshots/<commit>/<files>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder_files.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    return snap


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_hf_hub_weights_load_from_the_cache_offline(tmp_path, hf_cache, monkeypatch):
    import timm
    from timm.models import save_for_hf
    torch.manual_seed(0)
    src = timm.create_model("test_resnet", num_classes=5)
    save_for_hf(src, tmp_path / "export", safe_serialization=True)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["architecture"] == "test_resnet"
    _hf_cache(hf_cache, "visrep-test/tiny-resnet", tmp_path / "export")
    monkeypatch.setenv("VISREP_OFFLINE", "1")  # never ask the network
    model = create_backbone("timm:hf-hub:visrep-test/tiny-resnet", pretrained=True, num_classes=5)
    ref = src.state_dict()
    assert set(model.state_dict()) == set(ref)
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert model.data_config["input_size"][0] == 3


def test_hf_hub_without_cache_is_one_clear_error(hf_cache, monkeypatch):
    monkeypatch.setenv("VISREP_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable) as e:
        create_backbone("timm:hf-hub:timm/resnet18.a1_in1k", pretrained=True)
    msg = str(e.value)
    assert "'timm/resnet18.a1_in1k'" in msg and "network" in msg and "cached copy" in msg
    assert "timm lists no pretrained weights" not in msg and e.value.user_error
    monkeypatch.delenv("VISREP_OFFLINE")
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # conftest's; _offline() reads them per call
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr("visrep.zoo.registry.reachable", lambda *a, **k: False)  # no real connection attempted
    with pytest.raises(PretrainedWeightsUnavailable, match="cannot connect to huggingface.co"):
        create_backbone("timm:hf-hub:timm/resnet18.a1_in1k", pretrained=True)


# ----------------------------------------------------------------------------- Inception-v3's auxiliary classifier

@pytest.fixture(scope="module")
def inception_aux():
    torch.manual_seed(0)
    return create_backbone("inception_v3", num_classes=5, aux_classifiers=True)


def test_inception_v3_aux_logits_are_timms_and_trained_with_weight_0_3(inception_aux):
    """The recorded aux logits are timm's own ``InceptionV3(aux_logits=True)`` forward's (same state dict, key for
    key); the supervised objective adds 0.3 * CE(aux), and the aux head takes gradients."""
    import timm
    from visrep.engine.supervised import SupervisedConfig, SupervisedObjective, recorded_aux_logits

    m = inception_aux.train()
    with torch.device("meta"):
        ref = timm.create_model("inception_v3", num_classes=5, aux_logits=True)
    ref.load_state_dict(m.state_dict(), strict=True, assign=True)  # shares m's tensors: the same weights
    x, y = torch.randn(2, 3, 299, 299, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 4])
    with torch.no_grad():
        want_logits, want_aux = ref.train()(x)  # timm's forward: (logits, aux) in training
    trunk = [p for n, p in m.named_parameters() if not n.startswith(("AuxLogits.", "fc."))]
    for p in trunk:  # only the heads take gradients here: a short backward
        p.requires_grad_(False)
    try:
        logits = m(x)  # the zoo's: logits; batch statistics in train mode, so ref's running-stat update is moot
    finally:
        for p in trunk:
            p.requires_grad_(True)
    assert torch.equal(logits, want_logits)
    aux = recorded_aux_logits(m)
    assert len(aux) == 1 and aux[0] is m.aux_logits[0] and torch.equal(aux[0], want_aux)
    losses = SupervisedObjective(SupervisedConfig(), 5)(m, logits, y)
    ce = -torch.log_softmax(logits.detach().double(), 1)[torch.arange(2), y].mean()
    ce_aux = -torch.log_softmax(want_aux.double(), 1)[torch.arange(2), y].mean()
    assert losses["loss"].item() == pytest.approx((ce + 0.3 * ce_aux).item(), rel=1e-5)
    assert losses["aux"].item() == pytest.approx(ce_aux.item(), rel=1e-5)
    m.zero_grad()
    losses["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.AuxLogits.parameters())
    assert m.fc.weight.grad.abs().sum() > 0


def test_inception_v3_aux_contract_eval_and_errors(inception_aux):
    from visrep.engine.supervised import recorded_aux_logits
    from visrep.zoo.errors import BackboneArgumentError
    from visrep.zoo.inception import AUX_MIN_INPUT

    m = inception_aux
    assert m.feature_info[3]["module"] == "Mixed_6e" and m.num_features == 2048
    small = torch.randn(2, 3, 75, 75)
    m.eval()
    with torch.no_grad():
        assert m(small).shape == (2, 5)  # eval: no aux head run, so the main net's 75 px minimum holds
    assert m.aux_logits is None and recorded_aux_logits(m) == ()
    m.train()
    with pytest.raises(BackboneArgumentError, match=f"at least {AUX_MIN_INPUT}x{AUX_MIN_INPUT} px.*3x3 map"):
        m(small)
    with torch.device("meta"):
        bare = create_backbone("inception_v3", aux_classifiers=True)  # num_classes=0: nothing to classify
        assert bare.AuxLogits is None
        bare.reset_classifier(3)
        assert bare.AuxLogits.fc.out_features == 3 and bare.AuxLogits.conv1.conv.kernel_size == (5, 5)
        conv = bare.AuxLogits.conv1
        bare.reset_classifier(7)  # e.g. ImageNet's 1000 classes to a task's: both heads resized, aux convs kept
        assert bare.fc.out_features == bare.AuxLogits.fc.out_features == 7 and bare.AuxLogits.conv1 is conv
        feats = create_backbone("inception_v3", num_classes=3, aux_classifiers=True, features_only=True)
        assert feats.model.AuxLogits is None and feats.model.aux_logits is None
        assert create_backbone("inception_v3", num_classes=3).AuxLogits is None  # off by default
    with pytest.raises(BackboneArgumentError, match="only inception_v3"):
        create_backbone("resnet18", aux_classifiers=True)
    with pytest.raises(BackboneArgumentError, match="aux_classifiers=True instead"):
        create_backbone("inception_v3", num_classes=3, aux_logits=True)
    with pytest.raises(BackboneArgumentError, match="needs 299x299 inputs"):
        create_backbone("inception_v3", num_classes=3, aux_classifiers=True, small_input=True)
