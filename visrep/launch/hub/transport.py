"""Talking to the Hugging Face Hub: the token, reachability, errors, downloading a model's files (its two
files, and the transformers files an ``hf:`` model's export carries under ``hf/``; never a pickle) and
finding a model folder locally or on the Hub."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from visrep import __version__
from visrep.engine.export import CONFIG_NAME, HF_DIR, HF_FILES_KEY, WEIGHTS_NAME
from visrep.errors import MissingFileError, UserError
from visrep.zoo.net import connect, reachable

CARD_NAME = "README.md"
HUB_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)  # and, for transformers models, the files under hf/


def hub_files(folder: Path) -> list[str]:
    """The paths a push uploads from an ``export_for_hub`` folder: :data:`HUB_FILES` and the files under ``hf/``."""
    carried = sorted(p.relative_to(folder).as_posix() for p in (folder / HF_DIR).rglob("*") if p.is_file())
    return [*HUB_FILES, *carried]


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


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _endpoint(endpoint: Optional[str]) -> str:
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    try:
        connect(endpoint, timeout)
    except OSError as e:
        raise HubUnavailableError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({type(e).__name__}: {e}). Check the network (or "
            "HF_ENDPOINT), or write the files with export_for_hub(RUN_DIR, DIR) and upload them later with "
            "`hf upload USER/REPO DIR`.") from None


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
    cached_only = _offline() or not reachable(endpoint, timeout=5.0)
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
    folder = Path(weights).parent
    if Path(cfg).parent != folder:  # same snapshot folder in the cache
        raise HubError(f"'{repo}': {CONFIG_NAME} and {WEIGHTS_NAME} came from different revisions")
    _fetch_hf_files(repo, folder, token, kw)
    return folder


def _fetch_hf_files(repo: str, folder: Path, token: Optional[str], kw: dict) -> None:
    """The transformers files an export carries (``hf_files``: config, image-processor settings, tokenizer
    under ``hf/KEY``), downloaded into ``folder``, the snapshot of the commit config.json came from."""
    from huggingface_hub import snapshot_download

    config = json.loads((folder / CONFIG_NAME).read_text())
    carried = config.get("visrep", config).get(HF_FILES_KEY) or {}
    if not carried:
        return
    kw = {**kw, "revision": folder.name}  # the snapshot folder is named by its commit hash
    try:
        snapshot_download(repo, allow_patterns=[f"{sub}/*" for sub in carried.values()], **kw)
    except Exception as e:
        raise _hub_error(e, token, f"loading the transformers files of '{repo}' from the Hub") from None
    missing = [sub for sub in carried.values() if not (folder / sub).is_dir()]
    if missing:
        raise HubError(f"Hub repo '{repo}': {CONFIG_NAME} lists transformers files under {', '.join(missing)} "
                       f"({HF_FILES_KEY}) that the repo does not hold; push the run again with visrep.")


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


def _version() -> str:
    return __version__
