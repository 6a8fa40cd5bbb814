"""A voice chat saved as it goes, as a dialogue script that `csm-mlx dialogue` replays.

Each turn with words is written to DIR/NNN-user.wav or DIR/NNN-assistant.wav (the audio as heard)
and DIR/chat.yaml is rewritten after it: a list of {speaker, text, audio}. Every file is replaced
atomically, so a chat stopped at any moment leaves a readable transcript of its finished turns.
"""

import os
from pathlib import Path

import yaml

from ..audio import write_audio
from .local import ChatTurn

SCRIPT = "chat.yaml"


class TranscriptError(ValueError):
    """The transcript's directory cannot be used; the message says why."""


class Transcript:
    def __init__(self, directory: os.PathLike, user_speaker: int = 1, assistant_speaker: int = 0):
        self.directory = Path(directory)
        self.speakers = {"user": user_speaker, "assistant": assistant_speaker}
        self.turns: list = []
        if self.directory.exists() and not self.directory.is_dir():
            raise TranscriptError(f"{self.directory} exists and is not a directory: give a directory for the transcript")
        if (self.directory / SCRIPT).exists():
            raise TranscriptError(f"{self.directory} already holds a chat transcript: give a new directory")
        ancestor = self.directory
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not os.access(ancestor, os.W_OK):
            raise TranscriptError(f"cannot write the transcript in {self.directory}: {ancestor} is not writable")

    def add(self, turn: ChatTurn) -> None:
        if not turn.text or not len(turn.audio):
            return  # no words (a noise), or nothing heard: not part of the conversation
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{len(self.turns) + 1:03d}-{turn.role}.wav"
        write_audio(self.directory / name, turn.audio)
        self.turns.append({"speaker": self.speakers[turn.role], "text": turn.text, "audio": name})
        part = self.directory / f".{SCRIPT}.part"
        part.write_text(yaml.safe_dump(self.turns, sort_keys=False, allow_unicode=True), encoding="utf-8")
        os.replace(part, self.directory / SCRIPT)
