"""Model folders named by a local path or a Hugging Face hub id."""

from __future__ import annotations

from pathlib import Path


def not_a_model_source(known_stages: str) -> str:
    """The end of the message for a model reference that resolves to nothing."""
    return f"neither an earlier stage ({known_stages}), nor a folder, nor a hub id in the cache or on the hub"


def resolve_model_folder(name: str, what: str) -> Path:
    """``name`` as a local folder: an existing path, else a hub id fetched into (or, under
    ``HF_HUB_OFFLINE=1``, found in) the local Hugging Face cache. Raises ``FileNotFoundError`` saying
    which ``what`` could not be found."""
    local = Path(name).expanduser()
    if local.exists():
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(name))
    except HFValidationError:
        raise FileNotFoundError(f"{what} {name!r}: no such folder, and not a hub id") from None
    except Exception as error:  # offline without a cached copy, unknown repo, no network
        raise FileNotFoundError(
            f"{what} {name!r}: no such folder, and the hub id could not be fetched or found in the local "
            f"cache ({type(error).__name__}); download it first or give a local folder"
        ) from None
