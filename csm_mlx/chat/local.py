"""Voice chat on this machine: a microphone (or a recording) in, the speakers out.

Turn detection runs on the input's thread, so a barge-in stops playback within one input block
(20 ms) of the detector's decision, whatever the MLX thread is doing; the MLX thread (the one
that calls run()) then cuts the reply. The user's turn is encoded by Mimi on a thread of its own
(turn_encoder.py) while the MLX thread transcribes it. Echo: with loudspeakers the microphone hears
the assistant, and nothing here cancels that echo, so in "speakers" mode no turn starts while the
assistant speaks (and for unmute_s after): the assistant never answers itself, and barging in
needs echo="headphones".
"""

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np

from ..player import Player
from .turn_encoder import TurnEncoder
from .turns import SpeechStarted, SpeechStopped, TurnDetector, TurnSettings
from .voice_chat import VoiceChat

ECHO_MODES = ("speakers", "headphones")


@dataclass
class ChatTurn:
    """A finished turn: who spoke, the words, and the audio as it was heard (24 kHz float32)."""

    role: str  # "user" or "assistant"
    text: str
    audio: np.ndarray
    interrupted: bool = False  # an assistant turn cut by a barge-in


class LocalChat:
    """Runs a VoiceChat against an audio source (Microphone or Recording) and a Player per reply.
    on_turn(ChatTurn) is called for every finished turn (a user turn with no words too)."""

    def __init__(self, chat: VoiceChat, source, settings: TurnSettings = TurnSettings(), *, echo: str = "speakers",
                 player: Callable[[], Player] = Player, on_turn: Callable[[ChatTurn], None] = lambda turn: None,
                 unmute_s: float = 0.3):
        if echo not in ECHO_MODES:
            raise ValueError(f"echo must be one of {', '.join(ECHO_MODES)}, got {echo!r}")
        self.chat, self.source, self.echo = chat, source, echo
        self._new_player, self._on_turn, self._unmute_s = player, on_turn, unmute_s
        self._detector = TurnDetector(settings)
        self._encoder: Optional[TurnEncoder] = None  # from run() on
        self._events: "queue.Queue" = queue.Queue()  # (event, the Future of a stopped turn's Mimi codes)
        self._lock = threading.Lock()
        self._player: Optional[Player] = None  # the reply playing now
        self._unmute_at = 0.0
        self._barged = threading.Event()
        self.barge_ins: List[float] = []  # perf_counter times playback was stopped by the user's speech

    def run(self, max_turns: Optional[int] = None) -> int:
        """Listen and answer until the source ends (a recording) or max_turns user turns were
        answered; returns how many were."""
        answered = 0
        mimi = self.chat.csm.mimi
        self._encoder = TurnEncoder(mimi.path, mimi.num_codebooks)
        self.source.start(self._on_audio)
        try:
            while max_turns is None or answered < max_turns:
                try:
                    event, codes = self._events.get(timeout=0.05)
                except queue.Empty:
                    if self.source.ended and self._events.empty():
                        break
                    continue
                if not isinstance(event, SpeechStopped):
                    continue
                text = self.chat.hear(event.audio, codes)
                self._on_turn(ChatTurn("user", text, event.audio))
                if text:
                    self._answer(text)
                    answered += 1
        finally:
            self.source.close()
            self._encoder.close()
        return answered

    def _on_audio(self, block: np.ndarray) -> None:
        """The input's thread: detect turns; a turn starting during playback is a barge-in."""
        with self._lock:
            playing = self._player is not None
            muted = self.echo == "speakers" and (playing or time.perf_counter() < self._unmute_at)
            for event in self._detector.feed(block, muted=muted):
                codes = None
                if isinstance(event, SpeechStarted):
                    if playing and not self._barged.is_set():
                        self._player.stop()
                        self.barge_ins.append(time.perf_counter())
                        self._barged.set()
                else:  # encoded from now on, while the MLX thread transcribes it
                    codes = self._encoder.encode(event.audio)
                self._events.put((event, codes))

    def _answer(self, text: str) -> None:
        reply = self.chat.reply(text)
        player = self._new_player()
        self._barged.clear()
        with self._lock:
            self._player = player
        chunks = []
        try:
            for chunk in reply:
                if self._barged.is_set():
                    break
                chunks.append(chunk)
                player.feed(chunk)
            if not self._barged.is_set():
                player.finish()  # returns early when a barge-in stops it
        except BaseException:
            player.stop()
            raise
        finally:
            with self._lock:
                self._player = None
                self._unmute_at = time.perf_counter() + self._unmute_s
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        if self._barged.is_set():
            heard = min(player.played, len(audio))
            self._on_turn(ChatTurn("assistant", reply.cut(heard), audio[:heard], interrupted=True))
        else:
            self._on_turn(ChatTurn("assistant", " ".join(reply.sentences), audio))
