"""Dialogue scripts: the turns of a conversation read from a text, JSON or YAML file."""

import re
from pathlib import Path
from typing import List

from .audio import AudioError, read_audio
from .segment import Segment, check_speaker


class ScriptError(ValueError):
    """A dialogue script that cannot be read; the message names the file and the turn."""


def read_script(path) -> List[Segment]:
    """Turns of a script: JSON/YAML (.json, .yaml, .yml) holding a list of {speaker, text, audio?}
    (audio paths relative to the file), or text lines "[speaker] text" (blank lines skipped)."""
    import yaml  # only scripts need it

    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScriptError(f"script {path} does not exist") from None
    except IsADirectoryError:
        raise ScriptError(f"script {path} is a directory: give a text, JSON or YAML file") from None
    except UnicodeDecodeError:
        raise ScriptError(f"script {path} is not UTF-8 text: convert it, e.g. with iconv -t UTF-8") from None
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        try:
            turns = yaml.safe_load(content)  # YAML is a superset of JSON
        except yaml.YAMLError as e:
            raise ScriptError(f"{path} is not valid JSON/YAML ({e})") from None
        if not isinstance(turns, list):
            raise ScriptError(f"{path} must hold a list of turns")
    else:
        turns = []
        for number, line in enumerate(content.splitlines(), 1):
            if line.strip():
                tag = re.fullmatch(r"\s*\[(\d+)\]\s*(.+)", line)
                if tag is None:
                    raise ScriptError(f"{path}:{number}: expected '[speaker] text', e.g. '[0] Hello'")
                turns.append({"speaker": int(tag.group(1)), "text": tag.group(2).strip()})
    segments = []
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or not isinstance(turn.get("text"), str) or not turn["text"].strip():
            raise ScriptError(f"{path}: turn {n} needs a speaker and a non-empty text")
        try:
            speaker = check_speaker(turn.get("speaker"))
        except ValueError as e:
            raise ScriptError(f"{path}: turn {n}: {e}") from None
        audio, source = None, None
        if turn.get("audio"):
            source = path.parent / str(turn["audio"])
            try:
                audio = read_audio(source)
            except AudioError as e:
                raise ScriptError(f"{path}: turn {n}: {e}") from None
        segments.append(Segment(speaker, turn["text"], audio, source=source))
    if not segments:
        raise ScriptError(f"{path} holds no turns")
    return segments
