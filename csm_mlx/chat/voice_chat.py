"""A spoken conversation with CSM as the voice: the user's turns (audio) in, the assistant's out.

CSM's context holds the conversation as it sounded: each user turn as its recorded audio and
transcript (user_speaker), each assistant sentence as the frames that were played (the voice's
speaker). The language model's context holds the same turns as text. A barge-in cuts the
assistant's turn in both to what the user heard.

All the MLX work (recognizer, language model, CSM) happens on the thread that calls hear() and
iterates replies. A reply interleaves them: while the audio already made is more than lead_s
ahead of playback, the language model writes its next sentence; otherwise CSM makes the next frame.
"""

import collections
import math
import time
from concurrent.futures import Future
from typing import Deque, Iterator, List, Optional, Union

import numpy as np

from ..api import CSM
from ..codec import FRAME_SAMPLES, SAMPLE_RATE, Mimi
from ..prompt import TokenizedSegment
from ..segment import Segment
from ..recognizer import Recognizer
from .responder import Responder

FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE


class VoiceChat:
    """The state of one voice chat; see the module docstring. voice is the assistant's voice
    prompt (a pinned Segment of assistant_speaker), speech_options go to CSM for every sentence
    (temperature, top_k, codebooks, ...)."""

    def __init__(self, csm: CSM, recognizer: Recognizer, responder: Responder,
                 voice: Union[Segment, TokenizedSegment, None] = None, *, assistant_speaker: int = 0,
                 user_speaker: int = 1, lead_s: float = 1.0, **speech_options):
        self.csm, self.recognizer, self.responder = csm, recognizer, responder
        self.assistant_speaker, self.user_speaker = assistant_speaker, user_speaker
        self.lead_s = lead_s
        self.speech_options = dict(speech_options, chunk_chars=0)  # one sentence, one CSM turn
        self.conversation = csm.conversation([voice] if isinstance(voice, Segment) else [])
        if isinstance(voice, TokenizedSegment):  # already encoded (a server's voice)
            self.conversation.history.append(voice)

    def hear(self, audio: np.ndarray, codes: Optional[Future] = None) -> str:
        """Transcribe a user's turn (24 kHz mono float32); a turn with words joins CSM's context.
        codes: the Future of the turn's Mimi codes, made on another thread meanwhile (a TurnEncoder's);
        without it, the turn is encoded here."""
        text = self.recognizer.transcribe(audio)
        if text and codes is None:
            self.conversation.add(Segment(self.user_speaker, text, np.asarray(audio, np.float32)))
        elif text:
            self.conversation.add(TokenizedSegment(self.csm.tokenizer.encode(text, self.user_speaker), codes.result()))
        return text

    def read(self, text: str) -> None:
        """A typed user turn: it joins CSM's context as text alone."""
        self.conversation.add(Segment(self.user_speaker, text))

    def reply(self, user_text: str, mimi: Optional[Mimi] = None) -> "Reply":
        """The assistant's answer to user_text: iterate it for audio chunks (24 kHz float32).
        mimi: the Mimi instance that decodes it (default: the CSM object's)."""
        return Reply(self, user_text, mimi)


class Reply:
    """One assistant turn in the making. Iterating gives its audio, one frame (80 ms) per chunk
    (with the watermark, in bursts of up to 0.37 s); sentences lists the sentences begun so far.
    cut(heard) ends it early: what follows the first `heard` samples leaves both contexts."""

    def __init__(self, chat: VoiceChat, user_text: str, mimi: Optional[Mimi] = None):
        self._chat = chat
        self.sentences: List[str] = []
        self.frames = 0  # frames generated
        self.first_frame: Optional[float] = None  # perf_counter time of the first frame
        self.first_sentence_at: Optional[float] = None  # perf_counter time the language model completed one
        self._history_start = len(chat.conversation.history)
        self._answer = chat.responder.reply(user_text)
        self._answer_done = False
        self._ready: Deque[str] = collections.deque()  # sentences written, not yet spoken
        self._audio = chat.csm.audio(self._frames(), mimi=mimi)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self._audio

    def _frames(self) -> Iterator[np.ndarray]:
        chat = self._chat
        while True:
            while not self._ready and not self._answer_done:
                self._write()
            if not self._ready:
                return
            self.sentences.append(self._ready.popleft())
            for frame in chat.conversation.frames(self.sentences[-1], chat.assistant_speaker, **chat.speech_options):
                self.frames += 1
                if self.first_frame is None:
                    self.first_frame = time.perf_counter()
                yield frame
                while not self._answer_done and self._ahead() > chat.lead_s:
                    self._write()

    def _write(self) -> None:
        """One token of the language model's answer."""
        try:
            sentence = next(self._answer)
        except StopIteration:
            self._answer_done = True
            return
        if sentence is not None:
            self._ready.append(sentence)
            if self.first_sentence_at is None:
                self.first_sentence_at = time.perf_counter()

    def _ahead(self) -> float:
        """Seconds of audio made beyond what has played, playback having started at the first frame."""
        return self.frames * FRAME_SECONDS - (time.perf_counter() - self.first_frame)

    def cut(self, heard: int) -> str:
        """Stop, and keep of this turn only its first `heard` samples (24 kHz) in CSM's context and
        their words (the part of a sentence heard, by its share of the frames) in the language
        model's. Returns the text heard."""
        self._audio.close()
        self._answer.close()
        chat = self._chat
        history = chat.conversation.history
        spoken = history[self._history_start:]
        frames_heard = math.ceil(heard / FRAME_SAMPLES)
        kept: List[TokenizedSegment] = []
        words: List[str] = []
        for sentence, turn in zip(self.sentences, spoken):
            if frames_heard <= 0:
                break
            n = turn.audio_codes.shape[1]
            if frames_heard >= n:
                kept.append(turn)
                words.append(sentence)
            else:
                part = sentence.split()
                part = " ".join(part[: max(1, round(len(part) * frames_heard / n))])
                kept.append(TokenizedSegment(chat.csm.tokenizer.encode(part, chat.assistant_speaker),
                                             turn.audio_codes[:, :frames_heard]))
                words.append(part)
            frames_heard -= n
        del history[self._history_start:]
        history.extend(kept)
        text = " ".join(words)
        chat.responder.heard(text)
        return text
