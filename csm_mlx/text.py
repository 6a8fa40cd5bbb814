"""Splitting long text into chunks the model speaks well: sentences, then clauses, then words."""

import re
from typing import List, Optional

from .options import FRAME_MS

# Words that end in a period without ending a sentence (compared lower-case, without the final period).
ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "cf", "fig", "no",
    "vol", "approx", "inc", "ltd", "co", "corp", "mt", "ave", "dept", "est", "a.m", "p.m", "u.s", "u.k",
}
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)")
_CLAUSE_END = re.compile(r"(?<=[,;:–—])\s+")


def split_sentences(text: str) -> List[str]:
    """Sentences of text, whitespace normalised; the punctuation stays with its sentence."""
    text = " ".join(text.split())
    sentences, start = [], 0
    for end in _SENTENCE_END.finditer(text):
        if end.group() == ".":
            before = text[start : end.start()].rsplit(" ", 1)[-1].lower()
            if before in ABBREVIATIONS or re.fullmatch(r"[a-z]", before) or re.fullmatch(r"[a-z](\.[a-z])+", before):
                continue
        following = text[end.end() :].lstrip()[:1]
        if following.islower():
            continue  # "e.g. this", "3 p.m. today"
        sentences.append(text[start : end.end()].strip())
        start = end.end()
    if text[start:].strip():
        sentences.append(text[start:].strip())
    return sentences


def _pack(pieces: List[str], max_chars: int) -> List[str]:
    """Join consecutive pieces with spaces while the result stays within max_chars."""
    chunks: List[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 1 + len(piece) <= max_chars:
            chunks[-1] += " " + piece
        else:
            chunks.append(piece)
    return chunks


def _split_long(sentence: str, max_chars: int) -> List[str]:
    if len(sentence) <= max_chars:
        return [sentence]
    clauses = _CLAUSE_END.split(sentence)
    if len(clauses) > 1:
        return [part for clause in _pack(clauses, max_chars) for part in _split_long(clause, max_chars)]
    words = sentence.split(" ")
    if len(words) > 1:
        return [part for chunk in _pack(words, max_chars) for part in _split_long(chunk, max_chars)]
    return [sentence[i : i + max_chars] for i in range(0, len(sentence), max_chars)]


def chunk_text(text: str, max_chars: int = 250) -> List[str]:
    """Chunks of at most max_chars: whole sentences packed together, a longer sentence split at
    its clause boundaries (, ; : dashes), then between words; only a single word longer than
    max_chars is cut inside."""
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    pieces = [part for sentence in split_sentences(text) for part in _split_long(sentence, max_chars)]
    return _pack(pieces, max_chars)


def max_audio_seconds(text: str) -> float:
    """The default frame cap: 3 s plus 0.12 s per non-space character. Speech runs at about
    12-15 characters a second, so a slow speaker gets ~50% headroom, while a model that never
    says it is done stops soon after the text could have been spoken."""
    return 3.0 + 0.12 * len("".join(text.split()))


def expected_seconds(text: str) -> float:
    """A rough length of text spoken at a conversational ~150 words per minute (0.4 s a word) plus
    half a second; used to plan playback, never to cut speech."""
    return 0.5 + 0.4 * len(text.split())


def frame_cap(text: str, max_audio_length_ms: Optional[float]) -> int:
    """Frames a chunk may take: max_audio_length_ms (checked: at least one frame), else from its length."""
    seconds = max_audio_seconds(text) if max_audio_length_ms is None else max_audio_length_ms / 1000
    return max(1, int(seconds * 1000 / FRAME_MS))
