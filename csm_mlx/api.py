"""The app API: text (and conversation context) in, 24 kHz speech out.

    from csm_mlx import CSM, Segment
    csm = CSM.load()                              # sesame/csm-1b, Mimi and the tokenizer from the hub
    speech = csm.generate("Hello there.", speaker=0)
    speech.audio, speech.sample_rate              # float32 numpy array, 24000
"""

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from . import hub
from .audio import check_context_audio, read_audio
from .checkpoint import load_model, read_config
from .codec import FRAME_SAMPLES, SAMPLE_RATE, Mimi
from .conversation import Conversation, frame_cap
from .engine import Engine
from .finetune import adapters
from .frames import TokenizedSegment, generate_batch, stack_frames
from .options import check_options, check_text, check_texts
from .segment import Segment, Speech, check_speaker
from .models import Model
from .text import chunk_text
from .tokenizer import TextTokenizer
from .watermark import PUBLIC_KEY, Watermarker, check_key

MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_REPO = "unsloth/Llama-3.2-1B"  # an ungated copy of the Llama-3.2 tokenizer
TOKENIZER_FILE = "tokenizer.json"
WATERMARK_DIR = "silentcipher"  # a bundled copy of SilentCipher's weights, beside the model

# The voice prompts of the sesame/csm-1b repo (prompts/NAME.wav) and the reference demo's transcripts.
VOICES: Dict[str, str] = {
    "conversational_a": (
        "like revising for an exam I'd have to try and like keep up the momentum because I'd "
        "start really early I'd be like okay I'm gonna start revising now and then like "
        "you're revising for ages and then I just like start losing steam I didn't do that "
        "for the exam we had recently to be fair that was a more of a last minute scenario "
        "but like yeah I'm trying to like yeah I noticed this yesterday that like Mondays I "
        "sort of start the day with this not like a panic but like a"
    ),
    "conversational_b": (
        "like a super Mario level. Like it's very like high detail. And like, once you get "
        "into the park, it just like, everything looks like a computer game and they have all "
        "these, like, you know, if, if there's like a, you know, like in a Mario game, they "
        "will have like a question block. And if you like, you know, punch it, a coin will "
        "come out. So like everyone, when they come into the park, they get like this little "
        "bracelet and then you can go punching question blocks around."
    ),
    "read_speech_a": (
        "And Lake turned round upon me, a little abruptly, his odd yellowish eyes, a little like those of "
        "the sea eagle, and the ghost of his smile that flickered on his singularly pale face, with a stern "
        "and insidious look, confronted me."
    ),
    "read_speech_b": (
        "He was such a big boy that he wore high boots and carried a jack knife. He gazed and gazed at the "
        "cap, and could not keep from fingering the blue tassel."
    ),
    "read_speech_c": (
        "All passed so quickly, there was so much going on around him, the Tree quite forgot to look to himself."
    ),
    "read_speech_d": (
        "Suddenly I was back in the old days Before you felt we ought to drift apart. It was some trick-the "
        "way your eyebrows raise."
    ),
}


def _given_file(explicit: os.PathLike) -> Path:
    path = Path(explicit).expanduser()
    if not path.is_file():
        raise hub.HubError(f"{path} {'is a directory: give the file' if path.is_dir() else 'does not exist'}")
    return path


def _local_or_hub(explicit: Optional[os.PathLike], beside_model: Path, repo: str, filename: str) -> Path:
    if explicit is not None:
        return _given_file(explicit)
    if beside_model.is_file():
        return beside_model
    return hub.download(repo, [filename]) / filename


def find_tokenizer(model_dir: Path, explicit: Optional[os.PathLike] = None) -> Path:
    """The tokenizer.json to use: explicit, else beside the model, else the ungated hub copy."""
    return _local_or_hub(explicit, model_dir / TOKENIZER_FILE, TOKENIZER_REPO, TOKENIZER_FILE)


def find_mimi(model_dir: Path, explicit: Optional[os.PathLike] = None) -> Path:
    """The Mimi weights to use: explicit, else beside the model, else Kyutai's hub repo."""
    return _local_or_hub(explicit, model_dir / MIMI_FILE, MIMI_REPO, MIMI_FILE)


def find_watermark(model_dir: Path) -> Optional[Path]:
    """The SilentCipher weights bundled beside the model, if any (else the hub's are used)."""
    bundled = model_dir / WATERMARK_DIR
    return bundled if bundled.is_dir() else None


class CSM:
    sample_rate = SAMPLE_RATE

    def __init__(self, model: Model, tokenizer: TextTokenizer, mimi: Mimi, model_dir: Optional[Path] = None,
                 watermarker: Optional[Watermarker] = None, watermark_key: Sequence[int] = PUBLIC_KEY):
        self.model = model
        self.tokenizer = tokenizer
        self.mimi = mimi
        self.model_dir = model_dir
        self.watermarker = watermarker  # None: speech comes out unmarked
        self.watermark_key = check_key(watermark_key)

    @classmethod
    def load(
        cls,
        model: str = hub.DEFAULT_MODEL,
        *,
        tokenizer: Optional[os.PathLike] = None,
        mimi: Optional[os.PathLike] = None,
        dtype: Optional[str] = "auto",
        watermark: bool = True,
        watermark_key: Optional[Sequence[int]] = None,
        adapter_path: Optional[os.PathLike] = None,
    ) -> "CSM":
        """Load a model (hub id, or a directory in original, transformers or MLX format).

        The tokenizer and Mimi weights come from the given paths, else from beside the
        model (a self-contained converted directory), else from the hub. dtype "auto" runs an
        unquantized model in float32 on the CPU backend, whose bfloat16/float16 products have
        no fast kernels (4-5x slower here), and as stored on a GPU; None keeps it as stored.

        Like the reference, all speech is watermarked (SilentCipher, with the reference's public
        key unless watermark_key gives your own 5 bytes), so that it can be identified as
        AI-generated; its weights come from beside the model, else from the hub. watermark=False
        turns it off. adapter_path: a directory `csm-mlx finetune` wrote, applied to the model."""
        key = check_key(PUBLIC_KEY if watermark_key is None else watermark_key)
        # the cheap checks first: given paths, then the config, before any download or allocation
        for explicit in (tokenizer, mimi):
            if explicit is not None:
                _given_file(explicit)
        if adapter_path is not None:
            adapters.read_config(adapter_path)
        model_dir = hub.resolve_model(model)
        read_config(model_dir)
        # without its weights nothing may be generated, and they load in a moment
        watermarker = Watermarker.load(find_watermark(model_dir)) if watermark else None
        tokenizer_path, mimi_path = find_tokenizer(model_dir, tokenizer), find_mimi(model_dir, mimi)
        csm_model, info = load_model(model_dir, dtype=None if dtype == "auto" else dtype)
        if dtype == "auto" and info["quantization"] is None and mx.default_device().type == mx.cpu:
            csm_model.set_dtype(mx.float32)
        if adapter_path is not None:
            adapters.load_adapters(csm_model, adapter_path)
        return cls(csm_model, TextTokenizer(tokenizer_path), Mimi(mimi_path), model_dir, watermarker, key)

    def voice(self, name: str, speaker: int = 0) -> Segment:
        """A voice preset of the reference demo: a pinned context segment for speaker."""
        if name not in VOICES:
            raise ValueError(f"unknown voice {name!r}: choose one of {', '.join(VOICES)}")
        filename = f"prompts/{name}.wav"
        local = self.model_dir / filename if self.model_dir else None
        path = local if local is not None and local.is_file() else hub.download(hub.DEFAULT_MODEL, [filename]) / filename
        return Segment(speaker, VOICES[name], read_audio(path), pinned=True)

    def tokenize(self, segment: Segment) -> TokenizedSegment:
        check_speaker(segment.speaker)
        check_text(segment.text, "context text")
        codes = None
        if segment.audio is not None:
            codes = self.mimi.encode(check_context_audio(segment.audio, f"context audio of speaker {segment.speaker}"))
        return TokenizedSegment(self.tokenizer.encode(segment.text, segment.speaker), codes, segment.pinned)

    def speech(self, codes: np.ndarray) -> Speech:
        """Speech for Mimi codes (32, frames), decoded in one pass and watermarked as a whole."""
        audio = self.mimi.decode(codes) if codes.shape[1] else np.zeros(0, np.float32)
        if self.watermarker is not None:
            audio = self.watermarker.watermark(audio, self.watermark_key, self.sample_rate)
        return Speech(audio, self.sample_rate, codes)

    def engine(self, max_batch: int = 8, **kwargs) -> Engine:
        """A continuous-batching engine over this model, for many concurrent requests (a server's):
        submit() from any thread, iterate each request for its frames. Close it when done."""
        return Engine(self, max_batch, **kwargs)

    def conversation(self, context: Sequence[Segment] = ()) -> Conversation:
        """A conversation to speak turn after turn, each generated turn becoming context."""
        return Conversation(self, context)

    def frames(self, text: str, speaker: int = 0, context: Sequence[Segment] = (), **kwargs) -> Iterator[np.ndarray]:
        """Mimi frames (32,) of text spoken by speaker after the context, as they are generated;
        keyword arguments (chunking, frame cap, sampling, seed) as for Conversation.frames."""
        return Conversation(self, context).frames(text, speaker, **kwargs)

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
        *,
        max_audio_length_ms: Optional[float] = None,
        **sampling,
    ) -> List[Speech]:
        """Speak several texts at once after the same context (a voice prompt, say); sampling
        (temperature, top_k, top_p, min_p, seed) as for Conversation.frames.

        Generation reads the weights once per step for the whole batch, so n texts take
        little more time than one; greedy, each text gets the audio it gets alone."""
        texts, speaker, max_audio_length_ms, sampling = self._check_batch(texts, speaker, max_audio_length_ms, sampling)
        codes = self._batch_codes(Conversation(self, context), texts, speaker, max_audio_length_ms, sampling)
        return [self.speech(c) for c in codes]

    def generate_many(
        self,
        texts: Sequence[str],
        speaker: int = 0,
        context: Sequence[Segment] = (),
        *,
        batch_size: int = 8,
        chunk_chars: int = 250,
        max_audio_length_ms: Optional[float] = None,
        seed: Optional[int] = None,
        **sampling,
    ) -> Iterator[Speech]:
        """Speak many independent texts (lines of a list, say) after the same context, batch_size
        chunks at a time; yield each text's Speech, in order, as soon as all its chunks are done.

        A text longer than chunk_chars (0: never) is split into sentence chunks that are
        generated side by side, each after the context alone (not after the chunks before it,
        as generate does), and decoded as one stream: throughput for a shared voice prompt,
        at the cost of the cross-chunk continuity that generate keeps. Bad input fails here,
        not at the first line."""
        texts, speaker, max_audio_length_ms, sampling = self._check_batch(
            texts, speaker, max_audio_length_ms, dict(sampling, seed=seed))
        seed = sampling.pop("seed")
        options = check_options(batch_size=batch_size, chunk_chars=chunk_chars)
        batch_size, chunk_chars = options["batch_size"], options["chunk_chars"]
        items = [(n, chunk) for n, text in enumerate(texts)
                 for chunk in (chunk_text(text, chunk_chars) if chunk_chars else [text])]
        conversation = Conversation(self, context)

        def speak():
            done: List[List[np.ndarray]] = [[] for _ in texts]
            next_text = 0
            for start in range(0, len(items), batch_size):
                group = items[start : start + batch_size]
                codes = self._batch_codes(conversation, [chunk for _, chunk in group], speaker, max_audio_length_ms,
                                          dict(sampling, seed=seed if start == 0 else None))
                for (n, _), c in zip(group, codes):
                    done[n].append(c)
                # a text is done when no later item belongs to it
                first_pending = items[start + batch_size][0] if start + batch_size < len(items) else len(texts)
                while next_text < first_pending:
                    yield self.speech(np.concatenate(done[next_text], axis=1))
                    done[next_text] = []
                    next_text += 1

        return speak()

    def _check_batch(self, texts: Sequence[str], speaker: int, max_audio_length_ms: Optional[float], sampling: dict):
        """Checked texts, speaker, frame cap and sampling options of a batch call."""
        if "stop_after_repeats" in sampling:
            raise TypeError("stop_after_repeats is not supported for batches: use max_audio_length_ms")
        options = check_options(speaker=speaker, max_audio_length_ms=max_audio_length_ms, **sampling)
        return check_texts(texts), options.pop("speaker"), options.pop("max_audio_length_ms"), options

    def _batch_codes(self, conversation: Conversation, texts: Sequence[str], speaker: int,
                     max_audio_length_ms: Optional[float], sampling: dict) -> List[np.ndarray]:
        caps = [frame_cap(t, max_audio_length_ms) for t in texts]
        prompts = [conversation.prompt(self.tokenizer.encode(t, speaker), max(caps)) for t in texts]
        return generate_batch(self.model, prompts, max_frames=caps, **sampling)

    def dialogue(self, turns: Sequence[Segment], voices: Sequence[Segment] = (), *, seed: Optional[int] = None,
                 **kwargs) -> Iterator[Speech]:
        """Speak a script turn by turn, each turn with the ones before as context.

        Turns with audio are taken as spoken (they become context and come back as they
        are); the others are generated. voices are pinned prompts, e.g. one per speaker.
        Yields each turn's Speech as soon as it is done; arguments as for Conversation.frames."""
        conversation = Conversation(self, [replace(v, pinned=True) for v in voices])
        for n, turn in enumerate(turns):
            if turn.audio is not None:
                conversation.add(turn)
                yield Speech(np.asarray(turn.audio, np.float32), self.sample_rate, conversation.history[-1].audio_codes)
            else:
                yield conversation.say(turn.text, turn.speaker, seed=seed if n == 0 else None, **kwargs)

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

        With the watermark on, audio is marked in blocks of one message (0.975 s; see
        watermark.StreamWatermarker): the first chunk comes once about 13 frames are generated
        instead of chunk_frames, and chunks then come in bursts of about one block."""
        chunk_frames = check_options(chunk_frames=chunk_frames)["chunk_frames"]
        source = self.frames(text, speaker, context, **kwargs)

        def chunks():
            pending = []
            for frame in source:
                pending.append(frame)
                if len(pending) == chunk_frames:
                    yield stack_frames(pending)
                    pending = []
            if pending:
                yield stack_frames(pending)

        decoded = self.mimi.decode_chunks(chunks())
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
