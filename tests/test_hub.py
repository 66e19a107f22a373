"""Hub export, push and load (visrep.launch.hub) -- CPU, no network.

The Hub is a local HTTP server on 127.0.0.1 that speaks the few routes huggingface_hub uses for a
push (create repo, validate README metadata, preupload, commit) and a download (HEAD/GET resolve, the
file tree of a snapshot download), and records every request.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from visrep.launch import (HubAuthError, HubUnavailableError, UnsafeWeightsError, export_for_hub,
                           load_backbone_from_hub, push_run, push_to_hub)
from helpers import free_port
from visrep.launch.hub import HUB_FILES, HubError
from visrep.zoo import create_backbone
from visrep.zoo.errors import CheckpointMismatchError

ROOT = Path(__file__).resolve().parent.parent
FAKE_TOKEN = "hf_FakeTokenForVisrepTests0123456789abcd"


# ----------------------------------------------------------------------------------------------
# A cheap run directory in the layout visrep.engine.run writes
# ----------------------------------------------------------------------------------------------
def _export(model, out: Path, name: str, num_classes: int, small_input: bool, kwargs: dict) -> None:
    """What ``visrep.engine.export.export_model`` leaves in RUN_DIR/models/STAGE."""
    from safetensors.torch import save_file

    from visrep.zoo import get_data_config

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    dc = json.loads(json.dumps(get_data_config(model)))
    (out / "config.json").write_text(json.dumps({"architecture": name, "num_classes": num_classes,
                                                 "small_input": small_input, "kwargs": kwargs, "data_config": dc,
                                                 "library": "visrep"}))


def make_run(root: Path, arch: str = "resnet20", num_classes: int = 10, small_input: bool = True,
             kwargs: dict | None = None, secret: str | None = FAKE_TOKEN) -> tuple[Path, torch.nn.Module]:
    kwargs = dict(kwargs if kwargs is not None else ({"width": 0.5} if arch == "resnet20" else {}))
    torch.manual_seed(0)
    model = create_backbone(arch, num_classes=num_classes, small_input=small_input, **kwargs).eval()
    run = root / "run"
    for stage in ("scratch", "kd"):
        _export(model, run / "models" / stage, arch, num_classes, small_input, kwargs)
    cfg = {"config": "recipes/configs/digits.yaml", "output_dir": str(run), "resume": None, "seed": 0,
           "data": {"source": "digits", "name": None, "data_dir": None, "image_size": 32, "channels": 3},
           "student": {"name": arch, "pretrained": False, "checkpoint": None, "small_input": small_input,
                       "kwargs": kwargs},
           "optim": {"name": "sgd", "lr": 0.1}, "schedule": {"epochs": 2},
           "run": {"batch_size": 64, "mixed_precision": "no"}}
    if secret:  # a careless config: the token under a key, and inside a string
        cfg["hub_token"] = secret
        cfg["note"] = f"pushed with {secret}"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (run / "results.json").write_text(json.dumps({"teacher_acc": 0.9812, "student_scratch_acc": 0.9401,
                                                  "student_kd_acc": 0.9533, "student_params": 12345,
                                                  "num_processes": 1}))
    (run / "state.json").write_text(json.dumps({"recipe": "distill", "global_step": 10, "stages": {
        "teacher": {"done": True}, "scratch": {"done": True}, "kd": {"done": True}}}))
    return run, model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _scan_for(token: str, *roots: Path) -> list[str]:
    hits = []
    for root in roots:
        for p in Path(root).rglob("*"):
            if p.is_file() and token.encode() in p.read_bytes():
                hits.append(str(p))
    return hits


# ----------------------------------------------------------------------------------------------
# A local stand-in for the Hub API
# ----------------------------------------------------------------------------------------------
class FakeHub:
    def __init__(self, reject_auth: bool = False):
        self.requests: list[dict] = []
        self.repos: dict[str, dict[str, bytes]] = {}
        self.reject_auth = reject_auth
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, code: int, obj) -> None:
                self._reply(code, json.dumps(obj).encode())

            def _record(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                hub.requests.append({"method": self.command, "path": self.path,
                                     "headers": {k.lower(): v for k, v in self.headers.items()},
                                     "body": body})
                return body

            def do_POST(self):
                body = self._record()
                path = self.path.split("?")[0]
                if hub.reject_auth:
                    auth = self.headers.get("Authorization", "")
                    return self._json(401, {"error": f"Invalid credentials in Authorization header ({auth})"})
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req['organization']}/{req['name']}"
                    hub.repos.setdefault(repo, {})
                    return self._json(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    return self._json(200, {"errors": [], "warnings": []})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if "/commit/" in path:
                    repo = path.split("/api/models/")[1].split("/commit/")[0]
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            v = item["value"]
                            hub.repos.setdefault(repo, {})[v["path"]] = base64.b64decode(v["content"])
                        elif item["key"] == "deletedFile":
                            hub.repos.get(repo, {}).pop(item["value"]["path"])
                    return self._json(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'1' * 40}",
                                            "commitOid": "1" * 40})
                return self._json(404, {"error": f"unknown route {path}"})

            def _resolve(self):
                self._record()
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":  # list_repo_tree
                    files = hub.repos.get(f"{parts[2]}/{parts[3]}", {})
                    return self._json(200, [{"type": "file", "path": name, "size": len(data),
                                             "oid": hashlib.sha1(data).hexdigest()} for name, data in files.items()])
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, fname = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
                    data = hub.repos.get(repo, {}).get(fname)
                    if data is not None:
                        etag = hashlib.sha256(data).hexdigest()
                        return self._reply(200, data, {"X-Repo-Commit": "1" * 40, "ETag": f'"{etag}"'},
                                           ctype="application/octet-stream")
                    if repo in hub.repos:
                        return self._reply(404, b"{}", {"X-Error-Code": "EntryNotFound",
                                                        "X-Error-Message": "Entry not found"})
                    return self._reply(404, b"{}", {"X-Error-Code": "RepoNotFound",
                                                    "X-Error-Message": "Repository not found"})
                return self._json(404, {"error": "not found"})

            do_GET = _resolve
            do_HEAD = _resolve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def posts(self, fragment: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST" and fragment in r["path"]]


@pytest.fixture
def online(monkeypatch):
    """The test session is offline (conftest); these tests talk to a local server only."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def no_login(monkeypatch, tmp_path):
    """No token anywhere: no HF_TOKEN, no stored login."""
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))


# ----------------------------------------------------------------------------------------------
# Export and load
# ----------------------------------------------------------------------------------------------
def test_export_folder_round_trips(tmp_path):
    run, model = make_run(tmp_path)
    out = export_for_hub(run, tmp_path / "hub", repo_id="me/resnet20-digits")
    assert sorted(p.name for p in out.iterdir()) == sorted(HUB_FILES)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "resnet20" and cfg["num_classes"] == 10  # not a timm architecture
    vis = cfg["visrep"]
    assert vis["architecture"] == "resnet20" and vis["num_classes"] == 10 and vis["small_input"] is True
    assert vis["kwargs"] == {"width": 0.5}
    assert vis["data_config"]["input_size"] == [3, 32, 32] and len(vis["data_config"]["mean"]) == 3
    assert vis["recipe"] == "distill" and vis["stage"] == "kd"  # the last finished stage
    assert vis["training_config"]["student"]["name"] == "resnet20"
    assert vis["results"]["student_kd_acc"] == 0.9533

    card = (out / "README.md").read_text()
    from huggingface_hub import ModelCard

    front = ModelCard(card).data  # the metadata the Hub reads
    assert front.library_name == "visrep" and "visrep" in front.tags and "visrep-distill" in front.tags
    assert front.pipeline_tag == "image-classification"
    assert "| student_kd_acc | 0.9533 |" in card and "| student_params | 12,345 |" in card
    assert "digits" in card
    assert "accelerate launch recipes/distill.py --config config.yaml" in card
    assert 'load_backbone_from_hub("me/resnet20-digits")' in card
    assert "timm.create_model" not in card

    loaded, loaded_cfg = load_backbone_from_hub(out, return_config=True)
    _same_weights(model, loaded)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model(x))
    assert loaded_cfg["visrep"]["stage"] == "kd"
    # an export straight from the run loads the same way
    _same_weights(model, load_backbone_from_hub(run / "models" / "kd"))
    # a new head on request
    assert load_backbone_from_hub(out, num_classes=3)(x).shape == (2, 3)


def test_stage_choice_and_errors(tmp_path):
    run, _ = make_run(tmp_path)
    out = export_for_hub(run, tmp_path / "hub", stage="scratch")
    assert json.loads((out / "config.json").read_text())["visrep"]["stage"] == "scratch"
    with pytest.raises(FileNotFoundError, match="no exported stage 'nope'.*kd, scratch"):
        export_for_hub(run, tmp_path / "hub2", stage="nope")
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        export_for_hub(tmp_path, tmp_path / "hub3")


@pytest.mark.parametrize("arch,small_input,kwargs", [("mobilenetv3_small_050", False, {}),
                                                     ("vit_tiny_patch16_224", True, {"depth": 2})])
def test_timm_backbone_loads_with_timm(tmp_path, arch, small_input, kwargs):
    import timm

    run, model = make_run(tmp_path, arch=arch, num_classes=7, small_input=small_input, kwargs=kwargs)
    out = export_for_hub(run, tmp_path / "hub", repo_id="me/tiny")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == arch and cfg["num_classes"] == 7
    pcfg = cfg["pretrained_cfg"]
    dc = cfg["visrep"]["data_config"]
    assert pcfg["input_size"] == dc["input_size"] and pcfg["mean"] == dc["mean"] and pcfg["std"] == dc["std"]
    assert not any(k in pcfg for k in ("url", "hf_hub_id", "file", "license"))
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "timm"
    assert 'timm.create_model("hf-hub:me/tiny", pretrained=True)' in card

    tm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    _same_weights(model, tm)
    size = tuple(dc["input_size"])
    assert tuple(tm.pretrained_cfg["input_size"]) == size
    x = torch.randn(2, *size)
    torch.testing.assert_close(tm(x), model(x))
    torch.testing.assert_close(load_backbone_from_hub(out).eval()(x), model(x))


def test_small_input_timm_cnn_is_visrep_only(tmp_path):
    # the 32x32 stem replaces timm's: timm could not rebuild it, so no timm config is claimed
    run, model = make_run(tmp_path, arch="mobilenetv3_small_050", small_input=True)
    out = export_for_hub(run, tmp_path / "hub")
    cfg = json.loads((out / "config.json").read_text())
    assert "pretrained_cfg" not in cfg and cfg["architecture"] == "mobilenetv3_small_050"
    assert "timm.create_model" not in (out / "README.md").read_text()
    _same_weights(model, load_backbone_from_hub(out))


def test_strict_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    run, _ = make_run(tmp_path)
    out = export_for_hub(run, tmp_path / "hub")
    sd = load_file(str(out / "model.safetensors"))
    sd["extra.weight"] = torch.zeros(1)
    del sd["fc.bias"]
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        load_backbone_from_hub(out)
    msg = str(err.value)
    assert str(out) in msg and "resnet20" in msg
    assert "missing keys (1): fc.bias" in msg and "unexpected keys (1): extra.weight" in msg

    cfg = json.loads((out / "config.json").read_text())  # weights of another architecture
    cfg["visrep"]["kwargs"] = {"width": 1.0}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_backbone_from_hub(out)


def test_never_unpickles(tmp_path, monkeypatch):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architecture": "resnet20", "num_classes": 10}))
    torch.save({"w": torch.zeros(1)}, d / "pytorch_model.bin")

    def boom(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", boom)
    with pytest.raises(UnsafeWeightsError, match="pytorch_model.bin"):
        load_backbone_from_hub(d)


def test_hub_repo_with_pickles_only_is_refused(tmp_path, online, monkeypatch):
    with FakeHub() as hub:
        hub.repos["someone/pickled"] = {"config.json": json.dumps({"architecture": "resnet20",
                                                                   "num_classes": 10}).encode(),
                                        "pytorch_model.bin": b"not loaded"}
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr("huggingface_hub.list_repo_files", lambda *a, **k: list(hub.repos["someone/pickled"]))
        with pytest.raises(UnsafeWeightsError, match="someone/pickled.*pytorch_model.bin"):
            load_backbone_from_hub("someone/pickled", cache_dir=tmp_path / "cache")
        assert not any(r["path"].endswith(".bin") for r in hub.requests)


# ----------------------------------------------------------------------------------------------
# Push
# ----------------------------------------------------------------------------------------------
def test_push_sends_one_commit_with_the_three_files(tmp_path, online, capsys, caplog, monkeypatch):
    run, model = make_run(tmp_path)
    expected = export_for_hub(run, tmp_path / "expected", repo_id="me/resnet20-digits")
    with FakeHub() as hub:
        info = push_to_hub(run, "me/resnet20-digits", token=FAKE_TOKEN, private=True, endpoint=hub.url,
                           commit_message="first model")
        assert "/me/resnet20-digits/commit/" in str(info)

        create = hub.posts("/api/repos/create")
        assert len(create) == 1
        req = json.loads(create[0]["body"])
        assert (req["organization"], req["name"], req["visibility"]) == ("me", "resnet20-digits", "private")
        commits = hub.posts("/commit/")
        assert len(commits) == 1 and commits[0]["path"].startswith("/api/models/me/resnet20-digits/commit/main")
        lines = [json.loads(l) for l in commits[0]["body"].decode().splitlines()]
        assert lines[0] == {"key": "header", "value": {"summary": "first model", "description": ""}}
        sent = {l["value"]["path"]: base64.b64decode(l["value"]["content"]) for l in lines[1:]}
        assert sorted(sent) == sorted(HUB_FILES)
        for name in HUB_FILES:
            assert sent[name] == (expected / name).read_bytes(), name
        # the token travels in the Authorization header and nowhere else
        assert all(r["headers"].get("authorization") == f"Bearer {FAKE_TOKEN}" for r in hub.requests)
        assert not any(FAKE_TOKEN.encode() in r["body"] for r in hub.requests)

        # and it loads back from the Hub (downloaded through the same local endpoint)
        cache = tmp_path / "cache"
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        loaded = load_backbone_from_hub("hf-hub:me/resnet20-digits", cache_dir=cache, token=FAKE_TOKEN)
        _same_weights(model, loaded)
        fetched = {r["path"].split("/")[-1] for r in hub.requests
                   if r["method"] in ("GET", "HEAD") and "/resolve/" in r["path"]}  # files (not listings)
        assert fetched == {"config.json", "model.safetensors"}

        # the zoo's own entry point: create_backbone("hf-hub:USER/REPO"), with a new head on request
        from visrep.zoo import create_backbone

        monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        _same_weights(model, create_backbone("hf-hub:me/resnet20-digits"))
        assert create_backbone("hf-hub:me/resnet20-digits", num_classes=3).num_classes == 3
        with pytest.raises(ValueError, match="loads its own weights"):
            create_backbone("hf-hub:me/resnet20-digits", pretrained=True)

    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err + caplog.text
    assert not _scan_for(FAKE_TOKEN, tmp_path / "expected", cache)


def test_hf_model_pushed_with_its_transformers_files_loads_without_its_source(tmp_path, online, monkeypatch):
    """An ``hf:`` backbone's export carries its transformers config (hf/architecture/); the push sends it in
    the same commit, and the model loads back from the Hub -- then offline, from the cache -- with the
    folder it was built from deleted: the same outputs."""
    import shutil

    transformers = pytest.importorskip("transformers")
    from accelerate import Accelerator
    from helpers import reset_accelerate
    from huggingface_hub import constants
    from visrep.engine import BackboneConfig
    from visrep.engine.export import export_model

    src, run = tmp_path / "src", tmp_path / "run"
    torch.manual_seed(0)
    transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1]).save_pretrained(src)
    model = create_backbone(f"hf:{src}", num_classes=5).eval()
    try:
        export_model(Accelerator(cpu=True), model, run / "models" / "finetune",
                     BackboneConfig(name=f"hf:{src}", small_input=False), 5, model.data_config)
    finally:
        reset_accelerate()
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "data": {"source": "digits"}}))
    (run / "results.json").write_text(json.dumps({"target_acc": 0.5}))
    (run / "state.json").write_text(json.dumps({"recipe": "finetune", "stages": {"finetune": {"done": True}}}))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    cache = tmp_path / "cache"
    with FakeHub() as hub:
        # an earlier push left a file this export does not carry (e.g. another model's image processor)
        hub.repos["me/hf-resnet"] = {"hf/architecture/preprocessor_config.json": b'{"image_mean": [0, 0, 0]}'}
        push_to_hub(run, "me/hf-resnet", token=FAKE_TOKEN, endpoint=hub.url)
        assert len(hub.posts("/commit/")) == 1  # the stale file deleted in the same commit
        assert sorted(hub.repos["me/hf-resnet"]) == sorted([*HUB_FILES, "hf/architecture/config.json"])
        shutil.rmtree(src)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        loaded = load_backbone_from_hub("me/hf-resnet", cache_dir=cache, token=FAKE_TOKEN).eval()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the server is gone: from the cache
    again = load_backbone_from_hub("me/hf-resnet", cache_dir=cache).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected) and torch.equal(again(x), expected)


def test_push_in_a_subprocess_with_env_token_and_endpoint(tmp_path):
    """As a user runs it: HF_ENDPOINT and HF_TOKEN from the environment; then timm loads `hf-hub:`."""
    run, model = make_run(tmp_path, arch="mobilenetv3_small_050", num_classes=5, small_input=False)
    code = ("import timm, torch\n"
            "from visrep.launch import push_to_hub\n"
            "print('pushed', push_to_hub(r'%s', 'me/mnv3'))\n"
            "m = timm.create_model('hf-hub:me/mnv3', pretrained=True)\n"
            "from safetensors.torch import save_file\n"
            "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, r'%s')\n"
            % (run, tmp_path / "timm_loaded.safetensors"))
    with FakeHub() as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN=FAKE_TOKEN, HF_HOME=str(tmp_path / "hf_home"),
                   HF_HUB_OFFLINE="0", OMP_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1")
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        assert len(hub.posts("/commit/")) == 1
        assert sorted(hub.repos["me/mnv3"]) == sorted(HUB_FILES)
    assert FAKE_TOKEN not in p.stdout + p.stderr
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "timm_loaded.safetensors"))
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert not _scan_for(FAKE_TOKEN, tmp_path / "hf_home", run / "models")


def test_push_run_main_process_only(tmp_path, online, capsys):
    from types import SimpleNamespace

    run_dir, _ = make_run(tmp_path)
    waits = []
    with FakeHub() as hub:
        for is_main in (False, True):
            run = SimpleNamespace(run_dir=run_dir, is_main=is_main, print=print,
                                  accelerator=SimpleNamespace(wait_for_everyone=lambda: waits.append(1)))
            push_run(run, "me/from-recipe", token=FAKE_TOKEN, endpoint=hub.url)
        assert push_run(run, None) is None  # no --push-to-hub: nothing happens
        assert len(hub.posts("/commit/")) == 1 and len(waits) == 2
    assert "pushed" in capsys.readouterr().out


def test_no_token_is_a_clear_error(tmp_path, online, no_login):
    run, _ = make_run(tmp_path, secret=None)
    with FakeHub() as hub:
        with pytest.raises(HubAuthError, match="HF_TOKEN.*hf auth login"):
            push_to_hub(run, "me/repo", endpoint=hub.url)
        assert hub.requests == []


def test_rejected_token_does_not_leak(tmp_path, online, capsys):
    run, _ = make_run(tmp_path)
    with FakeHub(reject_auth=True) as hub:  # the server echoes the Authorization header in its error
        with pytest.raises(HubAuthError) as err:
            push_to_hub(run, "me/repo", token=FAKE_TOKEN, endpoint=hub.url)
    assert FAKE_TOKEN not in str(err.value) and "refused" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err


def test_unreachable_and_offline_fail_fast(tmp_path, online, monkeypatch):
    """Refused, timed out, offline: each a clear HubUnavailableError, with a bounded connection
    timeout online and no connection at all offline."""
    from test_zoo import _record_connections

    run, _ = make_run(tmp_path)
    with pytest.raises(HubUnavailableError, match="cannot reach") as err:  # a real refusal on loopback
        push_to_hub(run, "me/repo", token=FAKE_TOKEN, endpoint=f"http://127.0.0.1:{free_port()}")
    assert FAKE_TOKEN not in str(err.value)
    with monkeypatch.context() as m:
        calls = _record_connections(m, fail=socket.timeout("timed out"))
        with pytest.raises(HubUnavailableError, match="cannot reach.*timed out"):
            push_to_hub(run, "me/repo", token=FAKE_TOKEN, endpoint="https://hub.invalid")
    assert calls == [(("hub.invalid", 443), 5.0)], "one attempt, with its timeout"

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    calls = _record_connections(monkeypatch)
    with pytest.raises(HubUnavailableError, match="offline"):
        push_to_hub(run, "me/repo", token=FAKE_TOKEN)
    with pytest.raises(HubUnavailableError, match="me/not-cached"):
        load_backbone_from_hub("me/not-cached", cache_dir=tmp_path / "empty-cache")
    assert calls == [], "offline: no connection is attempted"


def test_token_never_written(tmp_path):
    run, _ = make_run(tmp_path)
    out = export_for_hub(run, tmp_path / "hub", token=FAKE_TOKEN)
    assert not _scan_for(FAKE_TOKEN, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["visrep"]["training_config"]["hub_token"] == "<redacted>"
    # even without being told the token, a Hugging Face token pattern is scrubbed
    out2 = export_for_hub(run, tmp_path / "hub2")
    assert not _scan_for(FAKE_TOKEN, out2)


def test_non_backbone_export_is_pushed_as_is_but_not_loaded_as_a_backbone(tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "run" / "models" / "clip"
    d.mkdir(parents=True)
    save_file({"logit_scale": torch.zeros(())}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"library": "visrep", "kind": "clip", "model": {}, "data_config": {}}))
    out = export_for_hub(d, tmp_path / "hub")
    assert sorted(p.name for p in out.iterdir()) == sorted(HUB_FILES)
    assert json.loads((out / "config.json").read_text())["kind"] == "clip"
    with pytest.raises(Exception, match="'clip' model, not a zoo backbone.*load_clip"):
        load_backbone_from_hub(out)


def test_clip_run_pushed_and_loaded_back_from_the_hub(tmp_path, online, monkeypatch):
    """A CLIP export goes to the Hub with its config and loads back (both towers, same outputs) with
    load_clip_from_hub; loading it as a backbone, or a backbone as CLIP, says which loader to use."""
    from accelerate import Accelerator
    from helpers import reset_accelerate
    from visrep.clip import ClipModelConfig, TextTowerConfig, build_clip_model, export_clip, get_tokenizer, image_data_config
    from visrep.launch.hub import load_clip_from_hub

    torch.manual_seed(0)
    model = build_clip_model(ClipModelConfig(text=TextTowerConfig(width=32, heads=2, layers=1)), image_size=16)
    run = tmp_path / "run"
    try:
        export_clip(Accelerator(cpu=True), model, run / "models" / "clip", model.cfg, image_data_config(model),
                    {"image_size": 16})
    finally:
        reset_accelerate()
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "data": {"source": "digits"}}))
    (run / "results.json").write_text(json.dumps({"zero_shot_acc": 0.9, "num_processes": 1}))
    (run / "state.json").write_text(json.dumps({"recipe": "clip", "stages": {"clip": {"done": True}}}))
    x, t = torch.randn(2, 3, 16, 16), get_tokenizer(model)(["a handwritten 7", "the number two"])
    model.eval()
    with FakeHub() as hub:
        push_to_hub(run, "me/clip-digits", token=FAKE_TOKEN, endpoint=hub.url)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        loaded, meta = load_clip_from_hub("hf-hub:me/clip-digits", cache_dir=tmp_path / "cache", token=FAKE_TOKEN)
        assert meta["kind"] == "clip" and loaded.hub_source == "me/clip-digits"
        loaded.eval()
        a, b = model(x, t), loaded(x, t)
        for k in ("image_features", "text_features", "logit_scale"):
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
        with pytest.raises(Exception, match="not a zoo backbone.*load_clip_from_hub"):
            load_backbone_from_hub("me/clip-digits", cache_dir=tmp_path / "cache", token=FAKE_TOKEN)
    backbone_run, _ = make_run(tmp_path / "b")
    with pytest.raises(HubError, match="not a visrep CLIP model.*create_backbone"):
        load_clip_from_hub(backbone_run / "models" / "kd")


def test_adaptation_model_exported_for_the_hub_loads_back(tmp_path):
    """A domain-adaptation export (recipes/adapt.py's layout) goes through export_for_hub and loads back
    whole with load_adaptation_from_hub; as a backbone it is refused with the loader to use."""
    from accelerate import Accelerator

    from helpers import reset_accelerate
    from visrep.engine import BackboneConfig
    from visrep.engine.export import export_model
    from visrep.launch.hub import load_adaptation_from_hub
    from visrep.transfer.adapt import AdaptationModel
    from visrep.zoo import get_data_config

    torch.manual_seed(0)
    bb = BackboneConfig(name="resnet20", small_input=True, kwargs={"width": 0.25})
    model = AdaptationModel(create_backbone("resnet20", num_classes=0, small_input=True, width=0.25), 10, 16, 16).eval()
    run = tmp_path / "run"
    try:
        export_model(Accelerator(cpu=True), model, run / "models" / "adapt", bb, 10, get_data_config(model.backbone),
                     extra={"model_type": "AdaptationModel", "bottleneck_dim": 16, "discriminator_hidden": 16,
                            "method": "dann"})
    finally:
        reset_accelerate()
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "method": "dann"}))
    (run / "results.json").write_text(json.dumps({"target_acc": 0.6, "method": "dann"}))
    (run / "state.json").write_text(json.dumps({"recipe": "adapt", "stages": {"adapt": {"done": True}}}))
    out = export_for_hub(run, tmp_path / "hub")
    loaded, cfg = load_adaptation_from_hub(out)
    assert cfg["model_type"] == "AdaptationModel" and cfg["visrep"]["recipe"] == "adapt"
    _same_weights(model, loaded)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    with pytest.raises(HubError, match="domain-adaptation model.*load_adaptation_from_hub"):
        load_backbone_from_hub(out)
    backbone_run, _ = make_run(tmp_path / "b")
    with pytest.raises(HubError, match="no domain-adaptation model"):
        load_adaptation_from_hub(backbone_run / "models" / "kd")
