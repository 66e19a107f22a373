import dataclasses
from dataclasses import field
import re
from typing import Literal, Optional

import pytest
import yaml

from visrep.engine.config import (BackboneConfig, ConfigError, OptimConfig, RunConfig, from_dict, load_yaml,
                                  parse_config, to_dict)


@dataclasses.dataclass
class Sub:
    name: Literal["a", "b"] = "a"
    size: int = 3
    scale: float = 1.0
    pair: tuple[float, float] = (0.1, 0.2)


@dataclasses.dataclass
class Root:
    config: Optional[str] = None
    output_dir: str = "runs/x"
    seed: int = 0
    sub: Sub = dataclasses.field(default_factory=Sub)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)


def write(tmp_path, data):
    p = tmp_path / "preset.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_preset_then_overrides(tmp_path):
    p = write(tmp_path, {"seed": 3, "sub": {"name": "b", "scale": 2}, "optim": {"lr": 0.5}})
    cfg = parse_config(Root, ["--config", str(p), "--optim.lr", "0.2", "--output-dir", "out", "--sub.size", "7"])
    assert cfg.seed == 3 and cfg.sub.name == "b" and cfg.sub.scale == 2.0 and isinstance(cfg.sub.scale, float)
    assert cfg.optim.lr == 0.2 and cfg.output_dir == "out" and cfg.sub.size == 7 and cfg.config == str(p)
    assert to_dict(cfg)["sub"]["pair"] == [0.1, 0.2]


def test_unknown_yaml_key_names_key_file_and_choices(tmp_path):
    p = write(tmp_path, {"sub": {"sise": 3}})
    with pytest.raises(ConfigError) as e:
        load_yaml(Root, p)
    msg = str(e.value)
    assert "sub.sise" in msg and str(p) in msg and "size" in msg and "scale" in msg


def test_bad_yaml_values(tmp_path):
    with pytest.raises(ConfigError, match=r"sub\.name.*'a', 'b'"):
        from_dict(Root, {"sub": {"name": "c"}})
    with pytest.raises(ConfigError, match=r"sub\.size.*an integer"):
        from_dict(Root, {"sub": {"size": "three"}})
    with pytest.raises(ConfigError, match=r"sub\.pair.*2 items"):
        from_dict(Root, {"sub": {"pair": [1.0]}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(Root, tmp_path / "missing.yaml")


def test_cli_errors_name_the_flag_and_choices(capsys):
    with pytest.raises(SystemExit):
        parse_config(Root, ["--optim.name", "adam"])
    err = capsys.readouterr().err
    assert "--optim.name" in err and "sgd" in err and "adamw" in err
    with pytest.raises(SystemExit):
        parse_config(Root, ["--optim.lrr", "1"])
    assert "--optim.lrr" in capsys.readouterr().err


def test_value_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"optim\.lr.*positive"):
        parse_config(Root, ["--optim.lr", "-1"])
    with pytest.raises(ConfigError, match=r"run\.grad_accum"):
        parse_config(Root, ["--run.grad-accum", "0"])


# ----------------------------------------------------------------------------------------------
# YAML -> dataclass conversion (dacite with our hooks): strictness and messages
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Leaf:
    maybe_pair: Optional[tuple[int, float]] = None
    mode: Optional[Literal["x", "y"]] = None
    count: int = 1
    ratio: float = 0.5
    ids: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Mid:
    leaf: Leaf = field(default_factory=Leaf)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)


@dataclasses.dataclass
class Deep:
    output_dir: str = "runs/deep"
    mid: Mid = dataclasses.field(default_factory=Mid)


@dataclasses.dataclass
class Required:
    count: int


def error(cls, data, **kw):
    with pytest.raises(ConfigError) as e:
        from_dict(cls, data, **kw)
    return str(e.value)


def test_message_formats(tmp_path):
    p = write(tmp_path, {"sub": {"size": "three"}})
    with pytest.raises(ConfigError) as e:
        load_yaml(Root, p)
    assert str(e.value) == f"config key 'sub.size' in {p} has value 'three'; expected an integer."
    p = write(tmp_path, {"mid": {"leaf": {"cuont": 2}}})
    with pytest.raises(ConfigError) as e:
        load_yaml(Deep, p)
    assert str(e.value) == (f"unknown config key 'mid.leaf.cuont' in {p}. Valid keys under 'mid.leaf': "
                            f"count, ids, maybe_pair, mode, ratio.")
    assert error(Deep, {"ouput_dir": "x"}) == "unknown config key 'ouput_dir'. Valid keys: mid, output_dir."
    # prefix is prepended to every key
    assert "'top.mid.leaf.count'" in error(Deep, {"mid": {"leaf": {"count": "x"}}}, prefix="top.")
    assert "unknown config key 'top.mid.x'" in error(Deep, {"mid": {"x": 1}}, prefix="top.")


def test_bools_are_not_numbers():
    assert "'mid.leaf.count'" in error(Deep, {"mid": {"leaf": {"count": True}}})
    assert "expected a number" in error(Deep, {"mid": {"leaf": {"ratio": False}}})
    assert "'optim.grad_clip'" in error(Root, {"optim": {"grad_clip": True}})
    assert "'mid.leaf.ids'" in error(Deep, {"mid": {"leaf": {"ids": [1, True]}}})
    assert "'sub.pair'" in error(Root, {"sub": {"pair": [True, 1.0]}})
    assert "'sub.size' has value 1.5; expected an integer" in error(Root, {"sub": {"size": 1.5}})
    with pytest.raises(ConfigError, match="expected true or false"):
        from_dict(RunConfig, {"progress": 1})


def test_numbers_tuples_and_optionals():
    cfg = from_dict(Deep, {"mid": {"leaf": {"ratio": 2, "maybe_pair": [3, 4], "ids": (1, 2)}}})
    leaf = cfg.mid.leaf
    assert leaf.ratio == 2.0 and isinstance(leaf.ratio, float)
    assert leaf.maybe_pair == (3, 4.0) and isinstance(leaf.maybe_pair[1], float)
    assert leaf.ids == [1, 2] and isinstance(leaf.ids, list)
    assert from_dict(Root, {"sub": {"pair": [1, 2]}}).sub.pair == (1.0, 2.0)
    assert from_dict(Deep, {"mid": {"leaf": {"maybe_pair": None, "mode": None}}}).mid.leaf.maybe_pair is None
    assert from_dict(OptimConfig, {"grad_clip": None, "betas": [0.8, 0.9]}).betas == (0.8, 0.9)
    for bad in ([1], [1, 2, 3], [1.5, 2], "12", {"a": 1}):
        assert "2 items" in error(Deep, {"mid": {"leaf": {"maybe_pair": bad}}})
    assert "null or one of 'x', 'y'" in error(Deep, {"mid": {"leaf": {"mode": "z"}}})
    assert "has value None; expected an integer" in error(Deep, {"mid": {"leaf": {"count": None}}})
    assert "'run.trackers'" in error(Root, {"run": {"trackers": "jsonl"}})
    assert "'run.trackers'" in error(Root, {"run": {"trackers": {"jsonl": 1}}})


def test_sections_mappings_and_hyphens(tmp_path):
    assert error(Deep, {"mid": {"leaf": 3}}) == "config section 'mid.leaf' must be a mapping, got int."
    assert from_dict(Deep, {"mid": {"leaf": None}}).mid.leaf == Leaf()  # an empty YAML section
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=rf"'<root>' in {re.escape(str(p))} must be a mapping, got list"):
        load_yaml(Root, p)
    # any mapping for dict[str, Any]; its keys are kept as written
    kwargs = {"drop-rate": 0.1, "nested": {"a": [1, 2]}}
    cfg = from_dict(Deep, {"output-dir": "out", "mid": {"backbone": {"small-input": False, "kwargs": kwargs}}})
    assert cfg.output_dir == "out" and cfg.mid.backbone.small_input is False
    assert cfg.mid.backbone.kwargs == kwargs and cfg.mid.backbone.kwargs is not kwargs
    assert "expected a mapping" in error(Deep, {"mid": {"backbone": {"kwargs": [1]}}})
    p = write(tmp_path, {"run": {"batch-size": 8, "stop-after-steps": None}})
    assert load_yaml(Root, p).run.batch_size == 8
    p = write(tmp_path, {"run": {"batch-sise": 8}})
    with pytest.raises(ConfigError) as e:
        load_yaml(Root, p)
    assert f"'run.batch-sise' in {p}. Valid keys under 'run': batch_size, " in str(e.value)


def test_missing_required_key_and_defaults():
    assert error(Required, {}, prefix="x.") == "config key 'x.count' is missing and has no default; set it."
    assert from_dict(Required, {"count": 2}) == Required(2)
    cfg = from_dict(Root, {})
    assert cfg == Root() and cfg.run.trackers == ["jsonl"] and cfg.run.trackers is not RunConfig().trackers
    assert from_dict(Root, None) == Root()


def test_base_preset_merges_section_by_section(tmp_path):
    (tmp_path / "sub").mkdir()
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"seed": 3, "output-dir": "runs/base",
                                    "sub": {"name": "b", "size": 5, "pair": [0.3, 0.4]}, "optim": {"lr": 0.5}}))
    mid = tmp_path / "sub" / "mid.yaml"   # _base_ is relative to the preset's own folder
    mid.write_text(yaml.safe_dump({"_base_": "../base.yaml", "sub": {"size": 7}, "output_dir": "runs/mid"}))
    top = tmp_path / "top.yaml"
    top.write_text(yaml.safe_dump({"_base_": "sub/mid.yaml", "sub": {"pair": [0.9, 1.0]}, "optim": None}))
    cfg = load_yaml(Root, top)
    # from base: seed, sub.name, optim.lr (top's empty `optim:` keeps it); from mid: sub.size, output_dir (one
    # key however spelled); top: sub.pair
    assert (cfg.seed, cfg.sub.name, cfg.sub.size, cfg.sub.pair) == (3, "b", 7, (0.9, 1.0))
    assert cfg.output_dir == "runs/mid" and cfg.optim.lr == 0.5 and cfg.sub.scale == 1.0
    # command-line overrides still come last
    cfg = parse_config(Root, ["--config", str(top), "--sub.size", "9"])
    assert cfg.sub.size == 9 and cfg.sub.name == "b" and cfg.config == str(top)


def test_base_preset_errors(tmp_path):
    p = write(tmp_path, {"_base_": "nope.yaml"})
    with pytest.raises(ConfigError, match=r"the _base_ of '.*preset\.yaml' '.*nope\.yaml' does not exist"):
        load_yaml(Root, p)
    p = write(tmp_path, {"_base_": 3})
    with pytest.raises(ConfigError, match="config key '_base_'.*expected the path of another preset"):
        load_yaml(Root, p)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("_base_: b.yaml\n")
    b.write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"comes back to a file already read .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_yaml(Root, a)
    # a bad key in the base names both files
    b.write_text(yaml.safe_dump({"sub": {"sise": 1}}))
    with pytest.raises(ConfigError, match=r"'sub\.sise' in .*a\.yaml \(with its _base_ .*b\.yaml\)"):
        load_yaml(Root, a)
    # a base that is not a mapping
    b.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"'<root>' in .*b\.yaml must be a mapping, got list"):
        load_yaml(Root, a)
