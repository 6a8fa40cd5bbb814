"""Where weights come from: a local directory, or a Hugging Face hub repo cached by huggingface_hub."""

from pathlib import Path
from typing import List, Optional

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

DEFAULT_MODEL = "sesame/csm-1b"
MODEL_FILES = ["config.json", "*.safetensors", "tokenizer.json", "prompts/*"]


class HubError(RuntimeError):
    """A model that cannot be found or fetched; the message says what to do."""


def _looks_local(name: str) -> bool:
    """Hub ids are "owner/name"; anything else is meant as a path."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1


def download(repo_id: str, allow_patterns: Optional[List[str]] = None) -> Path:
    """The local snapshot of repo_id, downloading what is missing (cached by huggingface_hub)."""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except GatedRepoError:
        raise HubError(
            f"{repo_id} is gated: accept its terms on huggingface.co/{repo_id}, then run `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"hub repo {repo_id} not found (or private): check the name, or log in with `hf auth login`"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"hub repo {repo_id} has no such revision") from None
    except HFValidationError:
        raise HubError(f"{repo_id!r} is neither an existing directory nor a valid hub repo id") from None
    except LocalEntryNotFoundError:
        raise HubError(
            f"{repo_id} is not in the local hub cache and the hub cannot be reached "
            "(offline?): connect once to download it, or pass a local directory"
        ) from None


def resolve_model(name: str) -> Path:
    """A local checkpoint directory for name: an existing directory, or a hub repo id."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HubError(f"{name} is a file, not a model directory: give the directory that holds config.json")
    if _looks_local(name):
        raise HubError(f"model directory {name} does not exist")
    return download(name, MODEL_FILES)
