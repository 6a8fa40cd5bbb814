"""Writing the files of a fine-tuning run (adapters, their config, cached codes): whole or not at all."""

import os
import secrets
from pathlib import Path
from typing import Callable


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """write(name) writes a temporary sibling that is then renamed to path, so a reader (or a run
    stopped midway) never sees half a file and the file already there stays until the new one is
    whole. The sibling is created by write itself, with the usual mode (0666 less the umask), and
    keeps path's suffix: mx.save_safetensors appends .safetensors to a name without it."""
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.part{path.suffix}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
