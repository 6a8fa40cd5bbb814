"""The Llama-3.2 text tokenizer with CSM's framing: <|begin_of_text|>[speaker]text<|end_of_text|>."""

import os
from typing import List

from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"


class TokenizerError(ValueError):
    """A tokenizer.json that cannot serve CSM; the message says what to do."""


class TextTokenizer:
    def __init__(self, path: os.PathLike):
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise TokenizerError(f"{path} is not a readable tokenizer.json ({e})") from None
        bos, eos = self._tokenizer.token_to_id(BOS), self._tokenizer.token_to_id(EOS)
        if bos is None or eos is None:
            raise TokenizerError(f"{path} lacks the Llama-3 tokens {BOS} / {EOS}: use the Llama-3.2 tokenizer.json")
        self._tokenizer.post_processor = TemplateProcessing(
            single=f"{BOS}:0 $A:0 {EOS}:0",
            pair=f"{BOS}:0 $A:0 {EOS}:1 $B:1",
            special_tokens=[(BOS, bos), (EOS, eos)],
        )
        self.vocab_size = self._tokenizer.get_vocab_size()

    def encode(self, text: str, speaker: int) -> List[int]:
        """Token ids of one turn, framed as the reference frames it."""
        return self._tokenizer.encode(f"[{speaker}]{text}").ids
