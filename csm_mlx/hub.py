"""Where weights come from: a local directory, or a Hugging Face hub repo cached by huggingface_hub."""

from pathlib import Path
import os
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


def resolve_model(name: str, files: List[str] = MODEL_FILES, what: str = "model") -> Path:
    """A local checkpoint directory for name: an existing directory, or a hub repo id (files: the
    repo's files to fetch). what names the model in errors ("speech recognizer", say)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HubError(f"{name} is a file, not a {what} directory: give the directory that holds config.json")
    if _looks_local(name):
        raise HubError(f"{what} directory {name} does not exist")
    return download(name, files)


MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_REPO = "unsloth/Llama-3.2-1B"  # an ungated copy of the Llama-3.2 tokenizer
TOKENIZER_FILE = "tokenizer.json"
WATERMARK_DIR = "silentcipher"  # a bundled copy of SilentCipher's weights, beside the model


def given_file(explicit: os.PathLike) -> Path:
    path = Path(explicit).expanduser()
    if not path.is_file():
        raise HubError(f"{path} {'is a directory: give the file' if path.is_dir() else 'does not exist'}")
    return path


def _local_or_hub(explicit: Optional[os.PathLike], beside_model: Path, repo: str, filename: str) -> Path:
    if explicit is not None:
        return given_file(explicit)
    if beside_model.is_file():
        return beside_model
    return download(repo, [filename]) / filename


def find_tokenizer(model_dir: Path, explicit: Optional[os.PathLike] = None, repo: Optional[str] = None) -> Path:
    """The tokenizer.json to use: explicit, else beside the model, else the hub repo the model's
    config names (repo), else the ungated copy of Llama-3.2's."""
    return _local_or_hub(explicit, model_dir / TOKENIZER_FILE, repo or TOKENIZER_REPO, TOKENIZER_FILE)


def find_mimi(model_dir: Path, explicit: Optional[os.PathLike] = None) -> Path:
    """The Mimi weights to use: explicit, else beside the model, else Kyutai's hub repo."""
    return _local_or_hub(explicit, model_dir / MIMI_FILE, MIMI_REPO, MIMI_FILE)


def find_watermark(model_dir: Path) -> Optional[Path]:
    """The SilentCipher weights bundled beside the model, if any (else the hub's are used)."""
    bundled = model_dir / WATERMARK_DIR
    return bundled if bundled.is_dir() else None
