"""Publishing a finished run on the Hugging Face Hub, and loading it back.

A pushed model repo holds exactly three files, written in one commit:

* ``model.safetensors`` -- the exported weights (the zoo's key names; timm's for timm backbones);
* ``config.json`` -- what rebuilds the model. visrep's description (zoo name, number of classes,
  ``small_input``, builder kwargs, data config, the run's training config, recipe, stage, results)
  lives under ``"visrep"``. For a timm architecture the top level is timm's own hub config
  (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg`` with mean/std/input size),
  so ``timm.create_model("hf-hub:USER/REPO", pretrained=True)`` reads the same file; otherwise the
  top level repeats the export's keys (``visrep.engine.export`` format);
* ``README.md`` -- a model card: YAML front matter, the metrics table from ``results.json``, the
  dataset, the command that reproduces the run and the code that loads the model.

::

    export_for_hub("runs/distill", "hub/distill")               # the folder, nothing sent
    push_to_hub("runs/distill", "me/resnet20-digits-kd")        # one commit
    model = load_backbone_from_hub("me/resnet20-digits-kd")     # or a local folder

Loading reads ``config.json`` and ``model.safetensors`` only: nothing downloaded is ever unpickled,
and the weights must match the architecture key for key.

The token comes from ``token=``, ``HF_TOKEN`` or the Hugging Face login (``hf auth login``); it is
handed to ``huggingface_hub`` and to nothing else -- it is never written, logged or put in an error.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from visrep.errors import MissingFileError, UserError

__all__ = ["HubError", "HubAuthError", "HubUnavailableError", "UnsafeWeightsError", "export_for_hub",
           "push_to_hub", "push_run", "load_backbone_from_hub", "load_clip_from_hub", "load_adaptation_from_hub", "resolve_token",
           "HUB_FILES"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
HUB_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)
HUB_PREFIX = "hf-hub:"
_PICKLED = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
_REDACTED = "<redacted>"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_SECRET_KEY = re.compile(r"(^|_)(token|hf_token|hub_token|api_key|apikey|password|passwd|secret)$", re.I)


class HubError(UserError, RuntimeError):
    """Publishing to or loading from the Hugging Face Hub failed; the message says why and what to do."""


class HubAuthError(HubError):
    """No Hugging Face token is available (or the Hub refused it)."""


class HubUnavailableError(HubError):
    """The Hub cannot be reached (offline mode, no network, endpoint down) and nothing is cached."""


class UnsafeWeightsError(HubError):
    """Only pickled weights (.bin/.pt/...) were found; visrep loads safetensors only."""


# ----------------------------------------------------------------------------------------------
# Token
# ----------------------------------------------------------------------------------------------
def resolve_token(token: Optional[str] = None) -> str:
    """``token`` if given, else ``HF_TOKEN`` / the Hugging Face login (``huggingface_hub.get_token``)."""
    if token:
        return token
    import huggingface_hub

    found = huggingface_hub.get_token()
    if not found:
        raise HubAuthError(
            "no Hugging Face token found: pass token=..., set the HF_TOKEN environment variable, or log in "
            "once with `hf auth login` (a token with write access, https://huggingface.co/settings/tokens).")
    return found


def _scrub(text: str, token: Optional[str]) -> str:
    text = str(text)
    if token:
        text = text.replace(token, _REDACTED)
    return re.sub(r"hf_[A-Za-z0-9]{20,}", _REDACTED, text)


def _scrub_config(obj: Any, token: Optional[str]) -> Any:
    """A copy with secret-looking keys and any occurrence of the token removed."""
    if isinstance(obj, dict):
        return {k: (_REDACTED if _SECRET_KEY.search(str(k)) and obj[k] not in (None, "") else _scrub_config(v, token))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_scrub_config(v, token) for v in obj]
    if isinstance(obj, str):
        return _scrub(obj, token)
    return obj


# ----------------------------------------------------------------------------------------------
# Locating the model of a run
# ----------------------------------------------------------------------------------------------
def _is_model_dir(p: Path) -> bool:
    return (p / WEIGHTS_NAME).is_file() and (p / CONFIG_NAME).is_file()


def _stage_dir(models: Path, stage: str) -> Optional[Path]:
    d = models / stage
    if _is_model_dir(d):
        return d
    if _is_model_dir(d / "backbone"):  # BYOL: the whole module at the top, the encoder in backbone/
        return d / "backbone"
    return None


def _find_run_dir(model_dir: Path) -> Optional[Path]:
    for p in [model_dir, *model_dir.parents][:4]:
        if (p / "config.yaml").is_file() and (p / "models").is_dir():
            return p
    return None


def _resolve_source(src: str | os.PathLike, stage: Optional[str]) -> tuple[Path, Optional[Path], Optional[str]]:
    """(model dir, run dir or None, stage name or None) for a run dir or an exported model dir."""
    src = Path(src)
    if not src.exists():
        raise MissingFileError(f"'{src}' does not exist; pass a run directory (RUN_DIR with models/) or an "
                                f"exported model directory ({WEIGHTS_NAME} + {CONFIG_NAME}).")
    if (src / "models").is_dir():
        models = src / "models"
        if stage is not None:
            found = _stage_dir(models, stage)
            if found is None:
                have = sorted(p.name for p in models.iterdir() if p.is_dir() and _stage_dir(models, p.name))
                raise MissingFileError(f"run '{src}' has no exported stage '{stage}' (in {models}); "
                                        f"exported stages: {', '.join(have) or 'none'}.")
            return found, src, stage
        order: list[str] = []
        state = src / "state.json"
        if state.is_file():
            stages = json.loads(state.read_text()).get("stages", {})
            order = [n for n, rec in stages.items() if rec.get("done")]
        order += sorted(p.name for p in models.iterdir() if p.is_dir() and p.name not in order
                        and not p.name.startswith("."))
        for name in reversed(order):  # the last finished stage is the run's product (distill: kd)
            found = _stage_dir(models, name)
            if found is not None:
                return found, src, name
        raise MissingFileError(f"run '{src}' has no exported model under {models} (a finished stage writes "
                                f"models/STAGE/{WEIGHTS_NAME}); finish the run or pass an exported model directory.")
    if _is_model_dir(src):
        run_dir = _find_run_dir(src)
        name = None
        if run_dir is not None:
            rel = src.relative_to(run_dir / "models").parts
            name = rel[0] if rel else None
        return src, run_dir, stage or name
    raise MissingFileError(f"'{src}' is neither a run directory (no models/) nor an exported model "
                            f"(needs {WEIGHTS_NAME} and {CONFIG_NAME}).")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------
def _safetensors_shapes(path: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _same_function(ref, export_cfg: dict, in_chans: int) -> bool:
    """Whether timm's model and the zoo's map an input to the same feature-map shapes (a ``small_input``
    stem may change only strides, which the weights' shapes do not show). Checked on the meta device."""
    import torch

    from visrep.zoo import create_backbone

    size = tuple((export_cfg.get("data_config") or {}).get("input_size") or (in_chans, 224, 224))
    try:
        with torch.device("meta"):
            ours = create_backbone(export_cfg["architecture"], num_classes=int(export_cfg.get("num_classes", 0)),
                                   small_input=bool(export_cfg.get("small_input")), **(export_cfg.get("kwargs") or {}))
            x = torch.empty(1, *size)
            return tuple(ours.forward_features(x).shape) == tuple(ref.forward_features(x).shape)
    except Exception:
        return False


def _timm_config(export_cfg: dict, weights: Path) -> Optional[dict]:
    """timm's hub config for the export when timm can rebuild it key for key, else None (a visrep-written
    architecture, or a 32x32 ``small_input`` CNN whose stem timm does not know)."""
    try:
        from visrep.zoo.registry import get_backbone_entry

        entry = get_backbone_entry(export_cfg["architecture"])
    except Exception:
        return None
    if entry.source != "timm":
        return None
    import timm
    import torch

    model_args = dict(export_cfg.get("kwargs") or {})
    if export_cfg.get("small_input"):
        from visrep.zoo.timm_backbones import _small_input_kwargs

        model_args = _small_input_kwargs(entry.target, model_args)
    dc = export_cfg.get("data_config") or {}
    in_chans = (dc.get("input_size") or [3])[0]
    if in_chans != 3:
        model_args.setdefault("in_chans", in_chans)
    num_classes = int(export_cfg.get("num_classes", 0))
    try:
        with torch.device("meta"):
            ref = timm.create_model(entry.target, num_classes=num_classes, **model_args)
    except Exception:
        return None
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if expected != _safetensors_shapes(weights) or not _same_function(ref, export_cfg, in_chans):
        return None
    pcfg = {k: v for k, v in dict(ref.pretrained_cfg).items()
            if k not in ("url", "hf_hub_id", "hf_hub_filename", "file", "source", "state_dict", "tag",
                         "test_input_size", "test_crop_pct", "label_names", "label_descriptions", "label_offset",
                         "deploy_input_size", "license", "origin_url", "paper_ids", "paper_name", "notes")
            and v is not None}  # what described timm's published weights does not describe these
    pcfg["architecture"] = entry.target
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"):
        if dc.get(key) is not None:
            pcfg[key] = list(dc[key]) if isinstance(dc[key], (list, tuple)) else dc[key]
    if list(pcfg.get("input_size", []))[1:] != list(ref.pretrained_cfg.get("input_size", []))[1:]:
        pcfg.pop("pool_size", None)
    pcfg["num_classes"] = num_classes
    pcfg["custom_load"] = False
    out = {"architecture": entry.target, "num_classes": num_classes,
           "num_features": int(getattr(ref, "num_features", 0))}
    gp = getattr(ref, "global_pool", None)
    gp = getattr(gp, "pool_type", gp)
    if isinstance(gp, str) and gp:
        out["global_pool"] = gp
    if model_args:
        out["model_args"] = model_args
    out["pretrained_cfg"] = json.loads(json.dumps(pcfg))
    return out


def _build_config(export_cfg: dict, weights: Path, training: dict, recipe: Optional[str], stage: Optional[str],
                  results: dict) -> tuple[dict, bool]:
    vis = dict(export_cfg)
    vis.setdefault("library", "visrep")
    vis.update({"recipe": recipe, "stage": stage, "results": results, "training_config": training})
    if "architecture" not in export_cfg:  # not a backbone (a CLIP model): kept as exported
        return {**export_cfg, "visrep": vis}, False
    timm_cfg = _timm_config(export_cfg, weights)
    if timm_cfg is None:
        return {**export_cfg, "visrep": vis}, False
    return {**timm_cfg, "data_config": export_cfg.get("data_config"), "visrep": vis}, True


# ----------------------------------------------------------------------------------------------
# README.md
# ----------------------------------------------------------------------------------------------
def _datasets(training: dict) -> list[tuple[str, dict]]:
    found = []

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, dict):
            if "source" in obj and ("name" in obj or "data_dir" in obj) and "data" in path.split(".")[-1]:
                found.append((path, obj))
                return
            for k, v in obj.items():
                walk(v, f"{path}.{k}" if path else str(k))

    walk(training, "")
    return found


def _describe_dataset(d: dict) -> str:
    src = d.get("source")
    if src == "hf":
        name = d.get("name") or "?"
        cfg = f" (config `{d['hf_config']}`)" if d.get("hf_config") else ""
        return f"[`{name}`](https://huggingface.co/datasets/{name}){cfg} from the Hugging Face Hub"
    if src == "imagefolder":
        return f"a local image folder (`{d.get('data_dir')}`, one sub-folder per class)"
    if src == "digits":
        return "scikit-learn's bundled 8x8 handwritten digits (embedded, no download)"
    return f"`{src}`" + (f" `{d.get('name')}`" if d.get("name") else "")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _reproduce_config(training: dict) -> dict:
    cfg = json.loads(json.dumps(training))
    for key in ("resume", "config"):
        if key in cfg:
            cfg[key] = None
    return cfg


def _model_card(repo_id: str, config: dict, timm_ok: bool, training: dict, results: dict,
                recipe: Optional[str], stage: Optional[str]) -> str:
    import yaml

    vis = config["visrep"]
    arch = vis.get("architecture") or vis.get("kind", "model")
    ncls = int(vis.get("num_classes", 0) or 0)
    datasets = _datasets(training)
    hub_datasets = sorted({d["name"] for _, d in datasets if d.get("source") == "hf" and d.get("name")})
    tags = ["visrep", "image-classification" if ncls else "image-feature-extraction", "safetensors"]
    if timm_ok:
        tags.append("timm")
    if recipe:
        tags.append(f"visrep-{recipe}")
    meta: dict[str, Any] = {"library_name": "timm" if timm_ok else "visrep", "tags": tags,
                            "pipeline_tag": "image-classification" if ncls else "image-feature-extraction"}
    if hub_datasets:
        meta["datasets"] = hub_datasets
    if any("acc" in k for k in results):
        meta["metrics"] = ["accuracy"]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {repo_id}", ""]
    what = f"`{arch}`" + (f" ({ncls} classes)" if ncls else " (backbone, no classifier)")
    origin = f" trained with the visrep recipe `{recipe}`" if recipe else ""
    origin += f" (stage `{stage}`)" if stage else ""
    lines += [f"A {what}{origin}. Weights in safetensors; `config.json` holds the architecture, the data "
              "config and the full training config.", ""]
    dc = vis.get("data_config") or {}
    if dc:
        lines += [f"Input: {tuple(dc.get('input_size', ()))}, mean {tuple(dc.get('mean', ()))}, "
                  f"std {tuple(dc.get('std', ()))}.", ""]

    lines += ["## Results", ""]
    rows = [(k, v) for k, v in results.items() if isinstance(v, (int, float)) or k == "method"]
    if rows:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows]
        lines += ["", "Accuracies are fractions in [0, 1] on the test split."]
    else:
        lines += ["No `results.json` was found for this run."]
    lines.append("")

    lines += ["## Dataset", ""]
    if datasets:
        lines += [f"- `{path}`: {_describe_dataset(d)}" for path, d in datasets]
    else:
        lines.append("Not recorded.")
    lines.append("")

    lines += ["## Reproduce", ""]
    if recipe and training:
        nproc = int(results.get("num_processes", 1) or 1)
        launch = "accelerate launch" + (f" --multi_gpu --num_processes {nproc}" if nproc > 1 else "")
        out_dir = training.get("output_dir") or f"runs/{recipe}"
        lines += ["Save the training config below as `config.yaml`, then, in a checkout of visrep:", "", "```bash",
                  f"{launch} recipes/{recipe}.py --config config.yaml",
                  f"visrep push {out_dir} {repo_id}" + (f" --stage {stage}" if stage else ""), "```", "",
                  "<details><summary>config.yaml (the resolved training config)</summary>", "", "```yaml",
                  yaml.safe_dump(_reproduce_config(training), sort_keys=False).rstrip(), "```", "", "</details>"]
    else:
        lines.append("The training config of this model was not recorded.")
    lines.append("")

    lines += ["## Load", "", "```python", "from visrep.launch import load_backbone_from_hub", "",
              f'model = load_backbone_from_hub("{repo_id}")  # safetensors only, keys checked strictly', "```"]
    if timm_ok:
        lines += ["", "With timm alone:", "", "```python", "import timm", "",
                  f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True)', "```"]
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Export / push
# ----------------------------------------------------------------------------------------------
def export_for_hub(src: str | os.PathLike, out_dir: str | os.PathLike, *, repo_id: Optional[str] = None,
                   stage: Optional[str] = None, token: Optional[str] = None) -> Path:
    """Write the three Hub files of a run (its last finished stage, or ``stage``) or of an exported model
    directory into ``out_dir``. ``repo_id`` names the repo in the model card. ``token`` is only used to
    make sure it does not appear in what is written. Returns ``out_dir``."""
    model_dir, run_dir, stage = _resolve_source(src, stage)
    export_cfg = _read_json(model_dir / CONFIG_NAME)
    training = _scrub_config(_read_yaml(run_dir / "config.yaml"), token) if run_dir else {}
    results = _scrub_config(_read_json(run_dir / "results.json"), token) if run_dir else {}
    recipe = _read_json(run_dir / "state.json").get("recipe") if run_dir else None
    export_cfg = _scrub_config(export_cfg, token)
    config, timm_ok = _build_config(export_cfg, model_dir / WEIGHTS_NAME, training, recipe, stage, results)
    repo_id = repo_id or "USER/REPO"
    card = _model_card(repo_id, config, timm_ok, training, results, recipe, stage)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_dir / WEIGHTS_NAME, out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    (out / CARD_NAME).write_text(card)
    return out


def _version() -> str:
    from visrep import __version__

    return __version__


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _endpoint(endpoint: Optional[str]) -> str:
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _reachable(endpoint: str, timeout: float = 5.0) -> bool:
    try:
        _connect(endpoint, timeout)
        return True
    except OSError:
        return False


def _connect(endpoint: str, timeout: float) -> None:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    with socket.create_connection((url.hostname or "", port), timeout=timeout):
        pass


def _check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    try:
        _connect(endpoint, timeout)
    except OSError as e:
        raise HubUnavailableError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({type(e).__name__}: {e}). Check the network (or "
            "HF_ENDPOINT), or write the files with export_for_hub(RUN_DIR, DIR) and upload them later with "
            "`hf upload USER/REPO DIR`.") from None


def push_to_hub(run_dir: str | os.PathLike, repo_id: str, token: Optional[str] = None, private: bool = False,
                stage: Optional[str] = None, commit_message: Optional[str] = None, *,
                endpoint: Optional[str] = None, revision: Optional[str] = None):
    """Push a run's model (``model.safetensors``, ``config.json``, ``README.md``) to ``repo_id`` in one
    commit, creating the repo if needed. Returns huggingface_hub's ``CommitInfo`` (its ``commit_url``).

    ``endpoint`` defaults to ``HF_ENDPOINT`` / huggingface.co. Call it on the main process only."""
    if repo_id.startswith(HUB_PREFIX):
        repo_id = repo_id[len(HUB_PREFIX):]
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo id {repo_id!r} must be USER/REPO (or ORG/REPO)")
    token = resolve_token(token)
    if _offline():
        raise HubUnavailableError("cannot push: Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1). Unset it, "
                                  "or write the files with export_for_hub(RUN_DIR, DIR) and upload them later.")
    endpoint = _endpoint(endpoint)
    from huggingface_hub import CommitOperationAdd, HfApi

    with tempfile.TemporaryDirectory(prefix="visrep-hub-") as tmp:
        folder = export_for_hub(run_dir, tmp, repo_id=repo_id, stage=stage, token=token)
        _check_reachable(endpoint)
        api = HfApi(endpoint=endpoint, token=token, library_name="visrep", library_version=_version())
        message = commit_message or f"Upload {Path(run_dir).name} with visrep"
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in HUB_FILES]
            return api.create_commit(repo_id, ops, commit_message=message, revision=revision, repo_type="model")
        except Exception as e:
            raise _hub_error(e, token, f"pushing to {repo_id} at {endpoint}") from None


def push_run(run, repo_id: Optional[str], **kwargs: Any):
    """``--push-to-hub USER/REPO`` at the end of a recipe: push ``run.run_dir`` (a ``visrep.engine.Run``)
    from the main process only; every process waits for it. No-op when ``repo_id`` is empty. Returns the
    ``CommitInfo`` on the main process, None elsewhere."""
    if not repo_id:
        return None
    info = None
    if run.is_main:
        info = push_to_hub(run.run_dir, repo_id, **kwargs)
        run.print(f"[visrep] pushed {run.run_dir} to {info.commit_url if hasattr(info, 'commit_url') else info}")
    run.accelerator.wait_for_everyone()
    return info


def finish_run(run, results: dict, table: str = "", push_to_hub: Optional[str] = None) -> dict:
    """The end of every recipe: results to the trackers and ``results.json``, the table printed once
    (``Run.finish``), then ``--push-to-hub``. Returns ``results``."""
    run.finish(results, table)
    push_run(run, push_to_hub)
    return results


def _hub_error(e: Exception, token: Optional[str], doing: str) -> HubError:
    """A HubError of the right kind for an exception from huggingface_hub, with the token scrubbed out."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)

    msg = _scrub(f"{type(e).__name__}: {e}", token)
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, (RepositoryNotFoundError, GatedRepoError)) or status in (401, 403):
        return HubAuthError(f"{doing}: the Hub refused access ({msg}). Check that the repo exists and that the "
                            "token (token=, HF_TOKEN or `hf auth login`) can access it, with write access to push.")
    if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)) or (
            not isinstance(e, HfHubHTTPError) and isinstance(e, (OSError, ConnectionError, TimeoutError))) or \
            "connect" in type(e).__name__.lower() or "timeout" in type(e).__name__.lower():
        return HubUnavailableError(f"{doing}: the Hub could not be reached and no cached copy was found ({msg}).")
    return HubError(f"{doing} failed: {msg}")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _refuse_pickles(files: list[str], where: str) -> None:
    import fnmatch

    pickled = [f for f in files if any(fnmatch.fnmatch(f, p) for p in _PICKLED)]
    if pickled:
        raise UnsafeWeightsError(
            f"{where} has no {WEIGHTS_NAME}, only pickled weights ({', '.join(sorted(pickled))}). visrep never "
            "unpickles downloaded files; convert them once to safetensors where you trust them "
            "(`safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')`).")


def _fetch(repo: str, token: Optional[str], revision: Optional[str], cache_dir) -> Path:
    """(local folder holding config.json and model.safetensors) for a Hub repo id."""
    from huggingface_hub import hf_hub_download
    try:
        from huggingface_hub.errors import RemoteEntryNotFoundError as _Missing
    except ImportError:  # huggingface_hub < 1.0
        from huggingface_hub.errors import EntryNotFoundError as _Missing

    if "@" in repo and revision is None:
        repo, revision = repo.split("@", 1)
    endpoint = _endpoint(None)
    # Unreachable Hub: answer from the cache at once instead of retrying with back-off.
    cached_only = _offline() or not _reachable(endpoint)
    kw = dict(revision=revision, token=token, cache_dir=cache_dir, library_name="visrep", library_version=_version(), endpoint=endpoint,
              local_files_only=cached_only)
    try:
        cfg = hf_hub_download(repo, CONFIG_NAME, **kw)
        try:
            weights = hf_hub_download(repo, WEIGHTS_NAME, **kw)
        except _Missing:
            files: list[str] = []
            try:
                from huggingface_hub import list_repo_files

                if not cached_only:
                    files = list_repo_files(repo, revision=revision, token=token)
            except Exception:
                pass
            _refuse_pickles(files, f"Hub repo '{repo}'")
            raise HubError(f"Hub repo '{repo}' has no {WEIGHTS_NAME}; it was not pushed with visrep.") from None
    except HubError:
        raise
    except Exception as e:
        raise _hub_error(e, token, f"loading '{repo}' from the Hub") from None
    if Path(cfg).parent != Path(weights).parent:  # same snapshot folder in the cache
        raise HubError(f"'{repo}': {CONFIG_NAME} and {WEIGHTS_NAME} came from different revisions")
    return Path(weights).parent


def _locate(repo_id_or_dir: str | os.PathLike, token: Optional[str], revision: Optional[str],
            cache_dir) -> tuple[str, Path, str]:
    """``(source, folder holding config.json and model.safetensors, description for errors)`` for a
    local folder or a Hub repo id (``hf-hub:`` prefix and ``@revision`` accepted)."""
    src = str(repo_id_or_dir)
    if src.startswith(HUB_PREFIX):
        src = src[len(HUB_PREFIX):]
    local = Path(src).expanduser()
    if local.is_dir():
        folder, where = local, f"local folder '{local}'"
        if not (folder / WEIGHTS_NAME).is_file():
            _refuse_pickles([p.name for p in folder.iterdir()], where)
            raise MissingFileError(f"{where} has no {WEIGHTS_NAME}")
        if not (folder / CONFIG_NAME).is_file():
            raise MissingFileError(f"{where} has no {CONFIG_NAME}")
    elif not _REPO_ID.match(src):
        raise MissingFileError(f"'{src}' is neither a local folder nor a Hub repo id (USER/REPO)")
    else:
        folder, where = _fetch(src, token, revision, cache_dir), f"Hub repo '{src}'"
    return src, folder, where


def _load_whole_model(repo_id_or_dir, token, revision, cache_dir, what: str, wrong_kind, loader):
    """What the loaders of whole exported models share: locate the folder, refuse it when
    ``wrong_kind(config, where, src)`` returns a message, rebuild it with ``loader(folder) -> (model,
    config)`` (strict keys: a mismatch is a ``HubError`` naming ``what``), remember where it came from."""
    src, folder, where = _locate(repo_id_or_dir, token, revision, cache_dir)
    problem = wrong_kind(json.loads((folder / CONFIG_NAME).read_text()), where, src)
    if problem:
        raise HubError(problem)
    try:
        model, config = loader(folder)
    except RuntimeError as e:  # strict load_state_dict: missing / unexpected keys, wrong shapes
        raise HubError(f"{where}: the weights do not match the {what} its {CONFIG_NAME} describes. {e}") from None
    model.hub_source = src
    return model, config


def load_clip_from_hub(repo_id_or_dir: str | os.PathLike, *, token: Optional[str] = None,
                       revision: Optional[str] = None, cache_dir=None):
    """Rebuild a pushed visrep CLIP model (both towers, projections, logit scale) with
    ``visrep.clip.load_clip`` and load its weights strictly; returns ``(model, config)``. The
    tokenizer follows from the model: ``visrep.clip.get_tokenizer(model)``. Same sources and rules as
    :func:`load_backbone_from_hub` (safetensors only; ``USER/REPO`` or a local folder)."""
    from visrep.clip import load_clip

    def wrong_kind(config, where, src):
        kind = config.get("kind")
        if kind != "clip":
            return (f"{where} holds a '{kind or 'backbone'}' model, not a visrep CLIP model; "
                    f"load backbones with visrep.zoo.create_backbone('hf-hub:{src}').")

    return _load_whole_model(repo_id_or_dir, token, revision, cache_dir, "CLIP model", wrong_kind, load_clip)


def load_adaptation_from_hub(repo_id_or_dir: str | os.PathLike, *, token: Optional[str] = None,
                             revision: Optional[str] = None, cache_dir=None):
    """Rebuild a pushed domain-adaptation model (``recipes/adapt.py``: backbone, bottleneck, classifier
    and discriminator) with ``visrep.transfer.adapt.load_adaptation_model``, weights loaded strictly;
    returns ``(model, config)``. Same sources and rules as :func:`load_backbone_from_hub`."""
    from visrep.transfer.adapt import load_adaptation_model

    def wrong_kind(config, where, src):
        if config.get("model_type") != "AdaptationModel":
            return (f"{where} holds no domain-adaptation model (its {CONFIG_NAME} has no model_type "
                    f"'AdaptationModel'); load backbones with visrep.zoo.create_backbone('hf-hub:{src}').")

    return _load_whole_model(repo_id_or_dir, token, revision, cache_dir, "model", wrong_kind, load_adaptation_model)


def load_backbone_from_hub(repo_id_or_dir: str | os.PathLike, *, token: Optional[str] = None,
                           revision: Optional[str] = None, cache_dir=None, return_config: bool = False,
                           **overrides: Any):
    """Rebuild a pushed backbone with ``visrep.zoo.create_backbone`` and load its weights strictly.

    ``repo_id_or_dir``: ``USER/REPO`` (``hf-hub:`` prefix and ``@revision`` accepted) or a local folder
    (a pushed repo's files, or an export ``RUN_DIR/models/STAGE``). Only ``config.json`` and
    ``model.safetensors`` are read. ``overrides`` go to ``create_backbone`` (``features_only``,
    ``out_indices``, builder kwargs such as ``drop_rate``); ``num_classes=K`` different from the saved head
    loads the weights and then ``reset_classifier(K)``. Returns the model (and the config with
    ``return_config=True``)."""
    from visrep.zoo import create_backbone
    from visrep.zoo.errors import CheckpointMismatchError

    src, folder, where = _locate(repo_id_or_dir, token, revision, cache_dir)
    config = json.loads((folder / CONFIG_NAME).read_text())
    vis = config.get("visrep", config)
    if "architecture" not in vis:
        kind = vis.get("kind", "unknown")
        hint = f" Load it with visrep.launch.hub.load_clip_from_hub('{src}')." if kind == "clip" else ""
        raise HubError(f"{where} holds a '{kind}' model, not a zoo backbone.{hint}")
    if vis.get("model_type") == "AdaptationModel":
        raise HubError(f"{where} holds a domain-adaptation model (backbone, bottleneck, classifier, domain "
                       f"discriminator), not a zoo backbone. Load it with "
                       f"visrep.launch.hub.load_adaptation_from_hub('{src}').")

    overrides = dict(overrides)
    for key in ("pretrained", "checkpoint"):
        if overrides.pop(key, None):
            raise ValueError(f"{key}= cannot be combined with loading '{src}' (its weights are the checkpoint)")
    saved_classes = int(vis.get("num_classes", 0) or 0)
    want_classes = overrides.pop("num_classes", None)
    small_input = bool(vis.get("small_input", False))
    if "small_input" in overrides and bool(overrides.pop("small_input")) != small_input:
        raise ValueError(f"{where} was trained with small_input={small_input}; it cannot be loaded otherwise")
    kwargs = dict(vis.get("kwargs") or {})
    input_size = (vis.get("data_config") or {}).get("input_size")
    if input_size and "in_chans" not in kwargs:
        kwargs["in_chans"] = int(input_size[0])
    kwargs.update(overrides)
    try:
        model = create_backbone(vis["architecture"], num_classes=saved_classes, small_input=small_input,
                                checkpoint=str(folder / WEIGHTS_NAME), **kwargs)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(
            f"{where}: the weights do not match architecture '{vis['architecture']}' (num_classes={saved_classes}, "
            f"small_input={small_input}, kwargs={kwargs}). {e}") from None
    if want_classes is not None and int(want_classes) != saved_classes:
        target = getattr(model, "model", model)  # a features_only wrapper keeps the backbone in .model
        target.reset_classifier(int(want_classes))
    model.hub_source = src
    return (model, config) if return_config else model
