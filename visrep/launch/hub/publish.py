"""Pushing a run to the Hub (one commit), and the end of every recipe (results, table, push)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from visrep.engine.export import HF_DIR
from visrep.launch.hub.card import export_for_hub
from visrep.launch.hub.transport import (HUB_PREFIX, HubUnavailableError, _check_reachable, _endpoint, _hub_error,
                                         _offline, _version, hub_files, resolve_token)
from visrep.report import report_run


def push_to_hub(run_dir: str | os.PathLike, repo_id: str, token: Optional[str] = None, private: bool = False,
                stage: Optional[str] = None, commit_message: Optional[str] = None, *,
                endpoint: Optional[str] = None, revision: Optional[str] = None):
    """Push a run's model (``model.safetensors``, ``config.json``, ``README.md``, and an ``hf:`` model's
    transformers files under ``hf/``) to ``repo_id`` in one commit, creating the repo if needed. Returns
    huggingface_hub's ``CommitInfo`` (its ``commit_url``).

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
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    with tempfile.TemporaryDirectory(prefix="visrep-hub-") as tmp:
        folder = export_for_hub(run_dir, tmp, repo_id=repo_id, stage=stage, token=token)
        _check_reachable(endpoint)
        api = HfApi(endpoint=endpoint, token=token, library_name="visrep", library_version=_version())
        message = commit_message or f"Upload {Path(run_dir).name} with visrep"
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            names = hub_files(folder)
            ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in names]
            # a push over an earlier one: transformers files this export does not carry (an old tokenizer, an
            # image processor's mean / std) would be downloaded with the new model, so they go in the same commit
            ops += [CommitOperationDelete(path_in_repo=name)
                    for name in _carried_on_hub(api, repo_id, revision) if name not in names]
            return api.create_commit(repo_id, ops, commit_message=message, revision=revision, repo_type="model")
        except Exception as e:
            raise _hub_error(e, token, f"pushing to {repo_id} at {endpoint}") from None


def _carried_on_hub(api, repo_id: str, revision: Optional[str]) -> list[str]:
    """The files under ``hf/`` in the repo now (none in a new repo or branch)."""
    from huggingface_hub.utils import EntryNotFoundError, RevisionNotFoundError

    try:
        return [f for f in api.list_repo_files(repo_id, revision=revision, repo_type="model")
                if f.startswith(f"{HF_DIR}/")]
    except (EntryNotFoundError, RevisionNotFoundError):
        return []


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
    (``Run.finish``), the report (``run.report``, main process, never fails the run), then ``--push-to-hub``.
    Returns ``results``."""
    run.finish(results, table)
    report_run(run)
    push_run(run, push_to_hub)
    return results
