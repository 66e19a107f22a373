"""Zoo contract: registry, creation, forward/backward, feature_info, features_only, checkpoints."""
import os

import pytest
import torch

from visrep.zoo.testing import check_backbone_contract
from visrep.zoo import (CheckpointMismatchError, PretrainedWeightsUnavailable, create_backbone,
                        get_data_config, list_backbones, register_backbone, save_checkpoint)

torch.manual_seed(0)


check_contract = check_backbone_contract


# ------------------------------------------------------------------ first deliverable


@pytest.mark.parametrize("name,params", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet56", 0.85)])
def test_cifar_resnets(name, params):
    m = create_backbone(name, num_classes=10)
    n = sum(p.numel() for p in m.parameters()) / 1e6
    assert abs(n - params) < 0.01
    check_contract(m, (3, 32, 32))
    assert m.data_config["input_size"] == (3, 32, 32)


def test_cifar_resnet_width():
    m = create_backbone("resnet20", width=2)
    assert m.num_features == 128
    assert [f["num_chs"] for f in m.feature_info] == [32, 32, 64, 128]
    check_contract(m, (3, 32, 32))


@pytest.mark.parametrize("name", ["mobilenetv2_050", "mobilenetv2_100", "resnet18"])
def test_small_input_variants(name):
    m = create_backbone(name, num_classes=10, small_input=True)
    check_contract(m, (3, 32, 32))
    assert m.data_config["input_size"] == (3, 32, 32)
    assert m.feature_info[0]["reduction"] == 1 and m.feature_info[-1]["reduction"] == 8
    assert m.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 4



# ------------------------------------------------------------------ registry


def test_list_and_prefixes():
    names = list_backbones()
    assert {"resnet20", "resnet18", "mobilenetv2_050"} <= set(names)
    assert list_backbones("resnet2*") == ["resnet20"]
    assert "resnet20" in list_backbones("net20")
    assert "timm:resnet18" in list_backbones("timm:resnet1*")
    m = create_backbone("timm:resnet10t", num_classes=3)
    check_contract(m, (3, 64, 64))
    with pytest.raises(KeyError, match="resnet20"):
        create_backbone("resnet2O")


def test_register_backbone_decorator():
    from visrep.zoo.cifar_resnet import CifarResNet

    @register_backbone("test_tiny_resnet8", overwrite=True)
    def _tiny(num_classes=0, in_chans=3, small_input=False, **kw):
        """A ResNet-8 for tests."""
        return CifarResNet(8, num_classes=num_classes, in_chans=in_chans, **kw)

    assert "test_tiny_resnet8" in list_backbones("test_tiny*")
    m = create_backbone("test_tiny_resnet8", num_classes=4, in_chans=1)
    check_contract(m, (1, 32, 32))
    with pytest.raises(KeyError):
        register_backbone("test_tiny_resnet8", _tiny)


def test_num_classes_zero_and_reset():
    m = create_backbone("resnet20")
    assert m.num_classes == 0 and m(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    m.reset_classifier(7)
    assert m.num_classes == 7 and m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    t = create_backbone("mobilenetv2_050", small_input=True)
    t.reset_classifier(5)
    assert t(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_features_only():
    f = create_backbone("resnet18", small_input=True, features_only=True, out_indices=(1, 2, 3, 4))
    outs = f(torch.randn(2, 3, 32, 32))
    assert [o.shape[1] for o in outs] == [fi["num_chs"] for fi in f.feature_info] == [64, 128, 256, 512]
    assert [32 // o.shape[-1] for o in outs] == [fi["reduction"] for fi in f.feature_info]
    f = create_backbone("resnet20", features_only=True, out_indices=(-1,))
    assert f(torch.randn(1, 3, 32, 32))[0].shape == (1, 64, 8, 8)
    assert get_data_config(f)["input_size"] == (3, 32, 32)
    with pytest.raises(IndexError):
        create_backbone("resnet20", features_only=True, out_indices=(9,))


# ------------------------------------------------------------------ weights


def test_checkpoint_roundtrip(tmp_path):
    m = create_backbone("resnet20", num_classes=10)
    path = save_checkpoint(m, tmp_path / "r20.safetensors")
    m2 = create_backbone("resnet20", num_classes=10, checkpoint=path)
    x = torch.randn(2, 3, 32, 32)
    m.eval(), m2.eval()
    assert torch.equal(m(x), m2(x))


def test_checkpoint_strict_error(tmp_path):
    m = create_backbone("resnet20", num_classes=10)
    path = save_checkpoint(m, tmp_path / "r20.safetensors")
    with pytest.raises(CheckpointMismatchError) as e:
        create_backbone("resnet20", num_classes=0, checkpoint=path)
    assert "fc.weight" in str(e.value) and "unexpected" in str(e.value) and str(path) in str(e.value)
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        create_backbone("resnet20", num_classes=10, width=2, checkpoint=path)
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        create_backbone("resnet32", num_classes=10, checkpoint=path)


def _record_connections(monkeypatch, fail=None):
    """Replace socket connections with a recorder: (address, timeout) of each attempt; ``fail``
    is raised for each (a timeout, a refusal) instead of touching the network."""
    import socket

    calls = []

    def create_connection(address, timeout=None, *a, **k):
        calls.append((address, timeout))
        raise (fail or AssertionError(f"unexpected connection to {address}"))

    def connect(self, address):
        calls.append((address, self.gettimeout()))
        raise (fail or AssertionError(f"unexpected connection to {address}"))

    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return calls


@pytest.mark.parametrize("name", ["resnet18", "tv:resnet18", "resnet20", "vgg11"])
def test_pretrained_offline_fails_without_opening_a_connection(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = _record_connections(monkeypatch)
    with pytest.raises(PretrainedWeightsUnavailable, match="checkpoint="):
        create_backbone(name, pretrained=True)
    assert calls == [], "offline: no connection is attempted"
    assert issubclass(PretrainedWeightsUnavailable, RuntimeError)


@pytest.mark.parametrize("name", ["resnet18", "tv:resnet18"])
def test_pretrained_unreachable_host_gives_up_after_a_bounded_timeout(name, monkeypatch):
    """Online but the weights' host does not answer: one bounded connection attempt per host (a
    finite timeout, never the OS default of minutes), then the clear error."""
    import socket

    for flag in ("HF_HUB_OFFLINE", "VISREP_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    calls = _record_connections(monkeypatch, fail=socket.timeout("timed out"))
    with pytest.raises(PretrainedWeightsUnavailable, match="cannot connect to .*checkpoint="):
        create_backbone(name, pretrained=True)
    assert calls and all(t is not None and 0 < t <= 5 for _, t in calls), calls


def test_offline_env_kept():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_deepcopy_pickle_and_prelogits_width():
    """EMA teachers deep-copy models; timm models whose head has a hidden layer report its width."""
    import copy
    import io
    m = create_backbone("mobilenetv3_small_050", num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    assert m.num_features == 1024 == m.forward_head(m.forward_features(x), pre_logits=True).shape[1]
    c = copy.deepcopy(m)
    c.reset_classifier(5)
    assert c(x).shape == (2, 5) and m(x).shape == (2, 3) and c.num_features == 1024
    buf = io.BytesIO()
    torch.save(c, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False).num_classes == 5
