"""Writing the files of a fine-tuning run (adapters, their config, cached codes): whole or not at all."""

import os
import secrets
from pathlib import Path
from typing import Callable

from ..audio import write_error


class WriteError(ValueError):
    """A file that could not be written (a full disk, say); the message names it and the reason."""


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """write(name) writes a temporary sibling that is then renamed to path, so a reader (or a run
    stopped midway) never sees half a file and the file already there stays until the new one is
    whole. The sibling is created by write itself, with the usual mode (0666 less the umask), and
    keeps path's suffix: mx.save_safetensors appends .safetensors to a name without it. A failed
    write (MLX says only "[write] Unable to write") is a WriteError saying why."""
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.part{path.suffix}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        reason = e.strerror.lower() if isinstance(e, OSError) and e.strerror else write_error(tmp)
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {reason}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
