import dataclasses
from typing import Literal, Optional

import pytest
import yaml

from visrep.engine.config import (ConfigError, OptimConfig, RunConfig, from_dict, load_yaml, parse_config,
                                  to_dict)


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
