"""Is the model a run names there to load? Checked on the driver before any worker or model starts.

Only what can be told cheaply: a built-in name, an existing local file or folder, a hub id that is in the
local hub cache, or one the hub can be asked about. Whether a folder or checkpoint really is a Stable
Diffusion model is the loader's question (`vidbatch.models.loading`), asked where the model loads.
"""

from __future__ import annotations

from pathlib import Path

from vidbatch.core.errors import ModelLoadError
from vidbatch.core.paths import looks_like_path

BUILTIN_MODELS = ("tiny", "sd15-random")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# Seconds to wait for the hub before calling it unreachable (a bounded wait, not a retry loop).
HUB_TIMEOUT_S = 10.0


def download_fix(model_id: str) -> str:
    """The one-line fix for a hub model that is not on this machine."""
    return (f"Fix: run `hf download {model_id}` on a machine with network access (with the same HF_HOME, or "
            "copy the hub cache here), or point model.id at a local diffusers folder or .safetensors file")


def _in_hub_cache(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model_id, "model_index.json"), str)
    except Exception:  # a malformed id: the hub question below names it
        return False


def _ask_hub(model_id: str) -> None:
    """Raises ModelLoadError when the hub cannot be reached or has no such model."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        model_info(model_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError as exc:
        raise ModelLoadError(f"model.id '{model_id}' is a gated hub model. Fix: accept its licence on the hub, "
                             "log in with `hf auth login`, then run `hf download " + model_id + "`") from exc
    except (RepositoryNotFoundError, HFValidationError) as exc:
        raise ModelLoadError(f"model.id '{model_id}': no such model on the hub and no such local folder. Fix: check "
                             "the id (e.g. 'stable-diffusion-v1-5/stable-diffusion-v1-5') or the path") from exc
    except Exception as exc:
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelLoadError(f"model.id '{model_id}' is not in the local hub cache and the hub cannot be reached "
                             f"({type(exc).__name__}: {cause}). {download_fix(model_id)}") from exc


def check_model_available(model_id: str, *, offline: bool) -> None:
    """Raises ModelLoadError (one line: the cause and the fix) when `model_id` cannot be there to load.

    `offline`: HF_HUB_OFFLINE is set, so a hub id must already be in the local hub cache.
    """
    model_id = str(model_id)
    if model_id in BUILTIN_MODELS or Path(model_id).expanduser().exists():
        return
    if model_id.startswith(("https://", "http://", "hf.co/", "huggingface.co/")):
        return  # a single file on the hub: the loader fetches and checks it
    if looks_like_path(model_id) or model_id.lower().endswith(SINGLE_FILE_SUFFIXES):
        raise ModelLoadError(f"model.id '{model_id}': no such file or folder. Fix: check the path, or use a hub id "
                             "such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'")
    if _in_hub_cache(model_id):
        return
    if offline:
        raise ModelLoadError(f"model.id '{model_id}' is not in the local hub cache and HF_HUB_OFFLINE is set. "
                             f"{download_fix(model_id)}")
    _ask_hub(model_id)
