"""The app API: text (and conversation context) in, 24 kHz speech out.

    from csm_mlx import CSM, Segment
    csm = CSM.load()                              # sesame/csm-1b, Mimi and the tokenizer from the hub
    speech = csm.generate("Hello there.", speaker=0)
    speech.audio, speech.sample_rate              # float32 numpy array, 24000
"""

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from . import hub
from .audio import read_audio
from .checkpoint import load_model, read_config, text_settings
from .codec import FRAME_SAMPLES, SAMPLE_RATE, Mimi
from .conversation import Conversation
from .engine import Engine
from .finetune import adapters
from .options import OptionError, check_options, check_texts
from .prompt import TokenizedSegment, stack_frames
from .recognizer import Recognizer
from .segment import Segment, Speech, check_segments
from .models import Model
from .static_batch import speak_all
from .text import chunk_text
from .tokenizer import TextTokenizer
from .utterance import make_utterance, tokenize_segment
from .voices import VOICES, model_voices, presets
from .watermark import PUBLIC_KEY, Watermarker, check_key


class CSM:
    sample_rate = SAMPLE_RATE

    def __init__(self, model: Model, tokenizer: TextTokenizer, mimi: Mimi, model_dir: Optional[Path] = None,
                 watermarker: Optional[Watermarker] = None, watermark_key: Sequence[int] = PUBLIC_KEY,
                 recognizer: Optional[Recognizer] = None):
        self.recognizer = recognizer  # transcribes context audio given without text
        self.model = model
        self.tokenizer = tokenizer
        self.mimi = mimi
        self.model_dir = model_dir
        self.watermarker = watermarker  # None: speech comes out unmarked
        self.watermark_key = check_key(watermark_key)

    @classmethod
    def load(
        cls,
        model: Union[str, os.PathLike] = hub.DEFAULT_MODEL,
        *,
        tokenizer: Optional[os.PathLike] = None,
        mimi: Optional[os.PathLike] = None,
        dtype: Optional[str] = "auto",
        watermark: bool = True,
        watermark_key: Optional[Sequence[int]] = None,
        adapter_path: Optional[os.PathLike] = None,
        asr: Optional[str] = None,
    ) -> "CSM":
        """Load a model (hub id, or a directory in original, transformers or MLX format).

        The tokenizer and Mimi weights come from the given paths, else from beside the
        model (a self-contained converted directory), else from the hub. dtype "auto" runs an
        unquantized model in float32 on the CPU backend, whose bfloat16/float16 products have
        no fast kernels (4-5x slower here), and as stored on a GPU; None keeps it as stored.

        Like the reference, all speech is watermarked (SilentCipher, with the reference's public
        key unless watermark_key gives your own 5 bytes), so that it can be identified as
        AI-generated; its weights come from beside the model, else from the hub. watermark=False
        turns it off. adapter_path: a directory `csm-mlx finetune` wrote, applied to the model.
        asr: a speech recognizer (an mlx-whisper model id or directory; the `chat` extra) that
        transcribes context segments given with audio and text=None."""
        key = check_key(PUBLIC_KEY if watermark_key is None else watermark_key)
        if not isinstance(model, (str, os.PathLike)):
            raise OptionError("model", f"must be a hub id or a directory, got {type(model).__name__}")
        model = os.fspath(model)
        # the cheap checks first: given paths, then the config, before any download or allocation
        for explicit in (tokenizer, mimi):
            if explicit is not None:
                hub.given_file(explicit)
        if adapter_path is not None:
            adapters.read_config(adapter_path)
        model_dir = hub.resolve_model(model)
        _, args, config = read_config(model_dir)
        speaker_space, tokenizer_repo = text_settings(config)
        # without its weights nothing may be generated, and they load in a moment
        watermarker = Watermarker.load(hub.find_watermark(model_dir)) if watermark else None
        tokenizer_path = hub.find_tokenizer(model_dir, tokenizer, repo=tokenizer_repo)
        mimi_path = hub.find_mimi(model_dir, mimi)
        csm_model, info = load_model(model_dir, dtype=None if dtype == "auto" else dtype)
        if dtype == "auto" and info["quantization"] is None and mx.default_device().type == mx.cpu:
            csm_model.set_dtype(mx.float32)
        if adapter_path is not None:
            adapters.load_adapters(csm_model, adapter_path)
        recognizer = Recognizer.load(asr) if asr is not None else None
        return cls(csm_model, TextTokenizer(tokenizer_path, speaker_space), Mimi(mimi_path, args.audio_num_codebooks),
                   model_dir, watermarker, key, recognizer)

    def voices(self) -> Dict[str, str]:
        """Name -> transcript of the voice presets: the model repo's own prompt clips, then those
        of the sesame/csm-1b repo (fetched from the hub when first used)."""
        return presets(self.model_dir)

    def voice(self, name: str, speaker: int = 0) -> Segment:
        """A voice preset (see voices()): a pinned context segment for speaker."""
        own = model_voices(self.model_dir)
        if name in own:
            return Segment(speaker, own[name], read_audio(self.model_dir / f"prompts/{name}.wav"), pinned=True)
        if name not in VOICES:
            raise OptionError("voice", f"{name!r} is not a voice preset: choose one of {', '.join(self.voices())}")
        filename = f"prompts/{name}.wav"
        return Segment(speaker, VOICES[name], read_audio(hub.download(hub.DEFAULT_MODEL, [filename]) / filename),
                       pinned=True)

    def transcribe(self, audio: np.ndarray) -> str:
        """The words of 24 kHz audio, by the speech recognizer CSM.load(asr=...) loaded."""
        if self.recognizer is None:
            raise OptionError("asr", "is needed to transcribe audio: load with CSM.load(asr=...), e.g. "
                                     "asr='mlx-community/whisper-large-v3-turbo', or give the transcript")
        return self.recognizer.transcribe(audio)

    def _transcribed(self, segments: Sequence[Segment], param: str = "context") -> List[Segment]:
        """The segments checked, those with audio and no text transcribed (a voice clip, say)."""
        segments = check_segments(segments, param)
        return [replace(s, text=self.transcribe(s.audio)) if s.text is None and s.audio is not None else s
                for s in segments]

    def tokenize(self, segment: Segment) -> TokenizedSegment:
        """A context turn as the model reads it (its audio encoded with Mimi)."""
        return tokenize_segment(self.tokenizer, self.mimi, segment)

    def speech(self, codes: np.ndarray) -> Speech:
        """Speech for Mimi codes (32, frames), decoded in one pass and watermarked as a whole."""
        audio = self.mimi.decode(codes) if codes.shape[1] else np.zeros(0, np.float32)
        if self.watermarker is not None:
            audio = self.watermarker.watermark(audio, self.watermark_key, self.sample_rate)
        return Speech(audio, self.sample_rate, codes)

    def engine(self, max_batch: int = 8, **kwargs) -> Engine:
        """A continuous-batching engine over this model, for many concurrent requests (a server's):
        submit() from any thread, iterate each request for its frames. Close it when done."""
        return Engine(self.model, self.tokenizer, self.mimi, max_batch, **kwargs)

    def conversation(self, context: Sequence[Segment] = ()) -> Conversation:
        """A conversation to speak turn after turn, each generated turn becoming context."""
        return Conversation(self.model, self.tokenizer, self.mimi, self._transcribed(context), speech=self.speech)

    def frames(self, text: str, speaker: int = 0, context: Sequence[Segment] = (), **kwargs) -> Iterator[np.ndarray]:
        """Mimi frames (32,) of text spoken by speaker after the context, as they are generated;
        keyword arguments (chunking, frame cap, sampling, seed) as for Conversation.frames."""
        return self.conversation(context).frames(text, speaker, **kwargs)

    def generate(
        self,
        text: str,
        speaker: int = 0,
        context: Sequence[Segment] = (),
        *,
        on_frame: Optional[Callable[[int], None]] = None,
        **kwargs,
    ) -> Speech:
        """Speak text as speaker after the context turns; arguments as for frames().
        on_frame(n) is called after each frame."""
        codes = []
        for frame in self.frames(text, speaker, context, **kwargs):
            codes.append(frame)
            if on_frame is not None:
                on_frame(len(codes))
        return self.speech(stack_frames(codes))

    def generate_batch(
        self,
        texts: Sequence[str],
        speaker: int = 0,
        context: Sequence[Segment] = (),
        **options,
    ) -> List[Speech]:
        """Speak several texts at once after the same context (a voice prompt, say); options
        (max_audio_length_ms, sampling, seed, stop_after_repeats) as for Conversation.frames,
        each text spoken whole (no chunking).

        Generation reads the weights once per step for the whole batch, so n texts take
        little more time than one; each text gets the frames generate gives it with the same
        seed (see csm_mlx.frame_batch on ties in the last bits)."""
        utterances = self._utterances(check_texts(texts), speaker, context, dict(options, chunk_chars=0))
        codes = dict(speak_all(self.model, utterances, len(utterances)))
        return [self.speech(codes[n]) for n in range(len(utterances))]

    def generate_many(
        self,
        texts: Sequence[str],
        speaker: int = 0,
        context: Sequence[Segment] = (),
        *,
        batch_size: int = 8,
        chunk_chars: int = 250,
        **options,
    ) -> Iterator[Speech]:
        """Speak many independent texts (lines of a list, say) after the same context, batch_size
        chunks at a time; yield each text's Speech, in order, as soon as all its chunks are done.

        A text longer than chunk_chars (0: never) is split into sentence chunks that are
        generated side by side, each after the context alone (not after the chunks before it,
        as generate does), and decoded as one stream: throughput for a shared voice prompt,
        at the cost of the cross-chunk continuity that generate keeps. Options as for
        generate_batch; a seed starts every chunk's sampling. Bad input fails here, not at the
        first line."""
        texts = check_texts(texts)
        sizes = check_options(batch_size=batch_size, chunk_chars=chunk_chars)
        batch_size, chunk_chars = sizes["batch_size"], sizes["chunk_chars"]
        split = [chunk_text(text, chunk_chars) if chunk_chars else [text] for text in texts]
        chunks = [chunk for text_chunks in split for chunk in text_chunks]
        ends = np.cumsum([len(text_chunks) for text_chunks in split])
        parts = [range(end - len(text_chunks), end) for end, text_chunks in zip(ends, split)]
        utterances = self._utterances(chunks, speaker, context, dict(options, chunk_chars=0))

        def speak():
            done = {}
            next_text = 0
            for n, codes in speak_all(self.model, utterances, batch_size):
                done[n] = codes
                while next_text < len(texts) and all(i in done for i in parts[next_text]):
                    yield self.speech(np.concatenate([done.pop(i) for i in parts[next_text]], axis=1))
                    next_text += 1

        return speak()

    def _utterances(self, texts: Sequence[str], speaker: int, context: Sequence[Segment], options: dict):
        """One utterance per text after the same context (tokenized once); all checked first."""
        history = [self.tokenize(s) for s in self._transcribed(context)]
        window = self.model.args.backbone.max_seq_len
        return [make_utterance(self.tokenizer, self.mimi, t, speaker, history, window=window, **options) for t in texts]

    def dialogue(self, turns: Sequence[Segment], voices: Sequence[Segment] = (), *, seed: Optional[int] = None,
                 **kwargs) -> Iterator[Speech]:
        """Speak a script turn by turn, each turn with the ones before as context.

        Turns with audio are taken as spoken (they become context and come back as they
        are); the others are generated. voices are pinned prompts, e.g. one per speaker.
        Yields each turn's Speech as soon as it is done; arguments as for Conversation.frames.
        Turns and voices of the wrong type fail here, not at the first turn."""
        turns = self._transcribed(turns, "turns")
        conversation = self.conversation([replace(v, pinned=True) for v in self._transcribed(voices, "voices")])

        def speak():
            nonlocal seed
            for turn in turns:
                if turn.audio is not None:
                    conversation.add(turn)
                    yield Speech(np.asarray(turn.audio, np.float32), self.sample_rate,
                                 conversation.history[-1].audio_codes)
                else:  # the first generated turn takes the seed; the others go on from its key
                    yield conversation.say(turn.text, turn.speaker, seed=seed, **kwargs)
                    seed = None

        return speak()

    def stream(
        self,
        text: str,
        speaker: int = 0,
        context: Sequence[Segment] = (),
        *,
        chunk_frames: int = 1,
        **kwargs,
    ) -> Iterator[np.ndarray]:
        """Audio chunks (float32, chunk_frames * 1920 samples; the last may be shorter) as frames
        are generated; arguments as for frames().

        Decoding is Mimi's streaming decoder: one state for the whole stream, reset when a
        stream starts, so chunks join with no seam. One stream at a time per CSM object.

        With the watermark on, audio is marked region by region (see watermark.StreamWatermarker):
        the first chunk comes once 7 frames are generated instead of chunk_frames, and
        chunks then come in bursts of up to a region (8 STFT hops, 0.37 s)."""
        return self.audio(self.frames(text, speaker, context, **kwargs), chunk_frames)

    def audio(self, frames: Iterable[np.ndarray], chunk_frames: int = 1, mimi: Optional[Mimi] = None) -> Iterator[np.ndarray]:
        """Audio chunks (float32, chunk_frames * 1920 samples; the last may be shorter) for frames
        as they come (from frames() or a Conversation's, say), decoded and marked as stream() does.
        mimi: the instance whose streaming state decodes them (default: this object's)."""
        chunk_frames = check_options(chunk_frames=chunk_frames)["chunk_frames"]

        def chunks():
            pending = []
            for frame in frames:
                pending.append(frame)
                if len(pending) == chunk_frames:
                    yield stack_frames(pending)
                    pending = []
            if pending:
                yield stack_frames(pending)

        decoded = (mimi or self.mimi).decode_chunks(chunks())
        return decoded if self.watermarker is None else self._marked(decoded, chunk_frames * FRAME_SAMPLES)

    def _marked(self, decoded: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
        """The stream's audio watermarked, in chunks of size samples (the last may be shorter)."""
        marker = self.watermarker.stream(self.watermark_key, self.sample_rate)
        ready = np.zeros(0, np.float32)
        for audio in decoded:
            ready = np.concatenate([ready, marker.feed(audio)])
            while len(ready) >= size:
                yield ready[:size]
                ready = ready[size:]
        ready = np.concatenate([ready, marker.flush()])
        for start in range(0, len(ready), size):
            yield ready[start : start + size]
