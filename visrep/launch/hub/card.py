"""The folder a push uploads: ``model.safetensors``, ``config.json`` (visrep's description under
``"visrep"``, timm's hub config at the top level for timm architectures), a ``README.md`` model card and,
for transformers models, the ``hf/`` files their export carries."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from visrep.checks import existing
from visrep.engine.export import HF_FILES_KEY
from visrep.errors import MissingFileError
from visrep.launch.hub.transport import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, _scrub_config
from visrep.zoo import create_backbone, get_backbone_entry
from visrep.zoo.timm_backbones import _small_input_kwargs


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
    src = existing(src, MissingFileError, f"'{src}' does not exist; pass a run directory (RUN_DIR with models/) or an "
                   f"exported model directory ({WEIGHTS_NAME} + {CONFIG_NAME}).", directory_too=True)
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

        entry = get_backbone_entry(export_cfg["architecture"])
    except Exception:
        return None
    if entry.source != "timm":
        return None
    import timm
    import torch

    model_args = dict(export_cfg.get("kwargs") or {})
    if export_cfg.get("small_input"):

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
    directory into ``out_dir``, and the transformers files its export carries (``hf/``, listed under
    ``hf_files``). ``repo_id`` names the repo in the model card. ``token`` is only used to
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
    for sub in (export_cfg.get(HF_FILES_KEY) or {}).values():  # an hf: model's transformers files travel along
        shutil.copytree(model_dir / sub, out / sub, dirs_exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    (out / CARD_NAME).write_text(card)
    return out
