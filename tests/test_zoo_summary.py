"""Summaries must reproduce the published figures."""
import pytest
import torch

from visrep.zoo import create_backbone
from visrep.zoo.summary import summarize


def test_resnet50_figures():
    s = summarize("resnet50", (3, 224, 224))
    assert round(s.params / 1e6, 1) == 25.6
    assert abs(s.macs / 1e9 - 4.1) < 0.05
    assert s.flops == 2 * s.macs


def test_vgg16_figures():
    s = summarize("vgg16", (3, 224, 224))
    assert round(s.params / 1e6) == 138
    assert abs(s.macs / 1e9 - 15.5) < 0.1


def test_layers_and_memory():
    s = summarize("resnet20", (3, 32, 32), batch_size=4, depth=1, num_classes=10)
    names = [r.name for r in s.layers]
    assert names[:4] == ["stem", "stages", "global_pool", "fc"][: len(names[:4])] or "stages" in names
    stage_row = next(r for r in s.layers if r.name == "stages")
    assert stage_row.output_shape == (4, 64, 8, 8)
    assert s.activation_bytes > 0
    one = s.training_memory_bytes(batch_size=1)
    many = s.training_memory_bytes(batch_size=64)
    assert many > one > s.param_bytes * 2
    assert s.training_memory_bytes(optimizer="sgd") < s.training_memory_bytes(optimizer="adamw")
    text = s.to_text()
    assert "est. training memory" in text and "stages" in text


def test_summary_of_instance_matches_name():
    m = create_backbone("resnet20", num_classes=10)
    a = summarize(m, (3, 32, 32))
    b = summarize("resnet20", (3, 32, 32), num_classes=10)
    assert a.params == b.params and a.macs == b.macs
    assert all(p.device.type == "cpu" for p in m.parameters())


@pytest.mark.parametrize("name,gmacs", [("resnet18", 1.82), ("mobilenetv2_100", 0.30), ("efficientnet_b0", 0.39),
                                        ("vit_base_patch16_224", 17.5), ("alexnet", 0.71)])
def test_known_macs(name, gmacs):
    s = summarize(name, (3, 224, 224))
    assert abs(s.macs / 1e9 - gmacs) / gmacs < 0.06, s.macs / 1e9


def test_meta_build_is_cheap():
    with torch.device("meta"):
        m = create_backbone("vgg16")
    assert next(m.parameters()).device.type == "meta"
