"""``easel models pull``: download a model into the Hugging Face cache.

Offline it fails in milliseconds, before importing torch or diffusers: with HF_HUB_OFFLINE set,
or when the hub's host cannot be reached (the hub client alone would retry for ~20 s).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from easel.domain import EaselError, ModelNotAvailable
from easel.models.catalog import ModelCatalog, hub_cache_dir, is_hub_id


def pull(catalog: ModelCatalog, model_id: str, *, progress: bool = True) -> Path:
    """Download a catalog model (or any hub id) and return its snapshot folder.

    Shows tqdm progress bars unless ``progress`` is False. Raises ModelNotAvailable with a
    one-line reason when offline or when the download fails.
    """
    try:
        repo_id = catalog.get(model_id).source
    except EaselError:
        if not is_hub_id(model_id):
            raise
        repo_id = model_id
    if not is_hub_id(repo_id):
        raise EaselError(
            f"model {model_id} is a local model at {repo_id}; nothing to download", field="model"
        )
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        raise ModelNotAvailable(
            f"cannot download {repo_id}: offline mode (HF_HUB_OFFLINE is set); run "
            "`easel models pull` on a machine with network and copy its Hugging Face cache",
            field="model",
        )
    _check_hub_reachable(repo_id)

    from diffusers import DiffusionPipeline
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if not progress:
        disable_progress_bars()
    try:
        # fetches only what from_pretrained needs (no .ckpt, no duplicate fp16 weights), and
        # safetensors only: a repo with pickled weights alone fails here (Easel never loads them)
        return Path(
            DiffusionPipeline.download(repo_id, cache_dir=hub_cache_dir(), use_safetensors=True)
        )
    except Exception as exc:  # network, auth and missing-repo errors all end the same way
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise ModelNotAvailable(f"cannot download {repo_id}: {reason}", field="model") from exc
    finally:
        if not progress:
            enable_progress_bars()


def _check_hub_reachable(repo_id: str) -> None:
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=5).close()
    except OSError as exc:
        raise ModelNotAvailable(
            f"cannot download {repo_id}: {url.hostname} is unreachable ({exc.strerror or exc}); "
            "check the network, or pull on another machine and copy its Hugging Face cache",
            field="model",
        ) from None
