"""The architecture's rules hold (ARCHITECTURE.md): imports run one way with no cycle, DeepSpeed lives in
one module, and code of a higher layer is reached by registration -- export kinds and zoo name prefixes."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import ROOT, env

sys.path.insert(0, str(ROOT / "tools"))
import check_imports  # noqa: E402


def test_the_tree_follows_the_import_rules():
    assert check_imports.check(ROOT) == []


def test_no_script_shadows_a_standard_module():
    """A script's directory is the first entry of ``sys.path`` when it runs, so ``recipes/ssl.py`` would be
    imported by ``http.client`` (through ``torch.hub``) in place of the standard ``ssl`` module, and every
    other recipe in that directory would fail at ``import torch``."""
    stdlib = sys.stdlib_module_names
    clashes = [str(f.relative_to(ROOT)) for d in ("recipes", "benchmarks", "tools", "tests") for f in (ROOT / d).glob("*.py")
               if f.stem in stdlib]
    assert clashes == [], f"rename these: their names are standard modules': {clashes}"


def test_the_checker_finds_cycles_layer_violations_and_deepspeed_outside(tmp_path):
    """The rules' checker on a small tree that breaks each rule once."""
    files = {
        "visrep/__init__.py": "",
        "visrep/zoo/__init__.py": "from visrep.engine import run\n",                 # zoo imports ours
        "visrep/data/__init__.py": "",
        "visrep/data/a.py": "from visrep.data import b\n",
        "visrep/data/b.py": "def f():\n    from visrep.data import a\n",               # a cycle, at any depth
        "visrep/engine/__init__.py": "",
        "visrep/engine/run.py": "import visrep.ssl.ema\n",                             # engine imports a method
        "visrep/engine/distributed.py": "x = p.ds_tensor\n",                          # allowed here
        "visrep/ssl/__init__.py": "",
        "visrep/ssl/ema.py": "n = p.ds_numel  # a shard\n",                          # ds_ outside
        "visrep/launch/__init__.py": "from visrep.ssl import ema\n",                  # launch imports a method
        "recipes/r.py": "import deepspeed\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    problems = "\n".join(check_imports.check(tmp_path))
    assert "visrep/zoo/__init__.py:1: the zoo imports nothing of ours" in problems
    assert "import cycle: visrep.data.a <-> visrep.data.b" in problems
    assert "visrep/engine/run.py:1: visrep.engine (layer 2) imports visrep.ssl.ema (layer 3)" in problems
    assert "visrep/ssl/ema.py:1: DeepSpeed internals" in problems and "distributed.py:1" not in problems
    assert "visrep/launch/__init__.py:1: visrep.launch (layer 4) imports visrep.ssl.ema (layer 3)" in problems
    assert "recipes/r.py:1: DeepSpeed internals in a recipe" in problems
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "check_imports.py"), str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "import cycle" in p.stdout


# ------------------------------------------------------------------ export kinds
def _export_tiny(tmp_path, kind="backbone", extra=None):
    from accelerate import Accelerator

    from visrep.engine import BackboneConfig
    from visrep.engine.export import export_model
    from visrep.zoo import create_backbone, get_data_config

    bb = BackboneConfig(name="resnet20", small_input=True, kwargs={"width": 0.25})
    model = create_backbone("resnet20", num_classes=3, small_input=True, width=0.25)
    export_model(Accelerator(cpu=True), model, tmp_path, bb, 3, get_data_config(model), extra=extra, kind=kind)
    return model


def test_every_export_names_its_kind_and_loads_by_it(tmp_path):
    from visrep.engine.export import WrongKindError, export_kind, load_exported

    model = _export_tiny(tmp_path / "bb")
    cfg = json.loads((tmp_path / "bb" / "config.json").read_text())
    assert cfg["kind"] == "backbone" and cfg["library"] == "visrep" and cfg["architecture"] == "resnet20"
    loaded, meta = load_exported(tmp_path / "bb")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(WrongKindError, match="holds a 'backbone' model, not a 'clip' model"):
        load_exported(tmp_path / "bb", kind="clip")
    # exports written before the key: adaptation models by their marker, the rest backbones
    assert export_kind({"architecture": "x"}) == "backbone"
    assert export_kind({"model_type": "AdaptationModel", "architecture": "x"}) == "adaptation"
    assert export_kind({"visrep": {"kind": "clip"}}) == "clip"


def test_an_unknown_kind_is_one_clear_error_and_a_registered_one_loads(tmp_path):
    from visrep.engine.export import load_exported, register_kind
    from visrep.errors import UserError

    _export_tiny(tmp_path / "x", kind="my-method")
    with pytest.raises(UserError, match="no loader is registered for exports of kind 'my-method'"):
        load_exported(tmp_path / "x")
    register_kind("my-method", lambda path: ("loaded", {"path": str(path)}))
    assert load_exported(tmp_path / "x")[0] == "loaded"


def test_kinds_and_prefixes_resolve_without_importing_the_code_behind_them(tmp_path):
    """A fresh interpreter that imports only the engine and the zoo: the clip loader and the hf-hub:
    prefix come from the installed entry points, and nothing of launch or clip was imported before."""
    script = textwrap.dedent('''
        import sys
        from visrep.engine.export import kind_loader
        from visrep.zoo.registry import _prefix_loader
        before = sorted(m for m in sys.modules if m.startswith(("visrep.clip", "visrep.launch", "visrep.transfer")))
        clip = kind_loader("clip")
        prefix, hub = _prefix_loader("hf-hub:me/model")
        print(before, clip.__module__, prefix, hub.__module__)
    ''')
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["[]", "visrep.clip.model", "hf-hub:", "visrep.launch.hub.load"]


def test_a_registered_prefix_builds_backbones():
    from visrep.zoo import create_backbone, register_prefix

    calls = []
    register_prefix("toy:", lambda name, **kw: calls.append((name, kw)) or torch.nn.Identity())
    assert isinstance(create_backbone("toy:abc", num_classes=4), torch.nn.Identity)
    assert calls[0][0] == "toy:abc" and calls[0][1]["num_classes"] == 4
    with pytest.raises(ValueError, match="loads its own weights"):
        create_backbone("toy:abc", pretrained=True)
