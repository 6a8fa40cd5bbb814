"""The text tokenizer with CSM's framing of a turn: <bos>[speaker]text<eos>.

csm-1b and MisoTTS use the Llama-3.2 tokenizer, whose turns are <|begin_of_text|> ...
<|end_of_text|>; Marvis uses SmolLM2's, whose turns are <|im_start|> ... <|im_end|>. Which pair
frames a turn is read from the tokenizer itself. MisoTTS puts a space after the speaker tag
("[0] text"), which its checkpoint's config says (speaker_prefix_space).
"""

import os
from typing import List

from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

# (begin, end) of a turn, in the order they are looked for.
TURN_TOKENS = [("<|begin_of_text|>", "<|end_of_text|>"), ("<|im_start|>", "<|im_end|>")]


class TokenizerError(ValueError):
    """A tokenizer.json that cannot serve CSM; the message says what to do."""


class TextTokenizer:
    def __init__(self, path: os.PathLike, speaker_space: bool = False):
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise TokenizerError(f"{path} is not a readable tokenizer.json ({e})") from None
        for bos, eos in TURN_TOKENS:
            bos_id, eos_id = self._tokenizer.token_to_id(bos), self._tokenizer.token_to_id(eos)
            if bos_id is not None and eos_id is not None:
                break
        else:
            raise TokenizerError(f"{path} has neither the Llama-3 tokens {' / '.join(TURN_TOKENS[0])} nor SmolLM2's "
                                 f"{' / '.join(TURN_TOKENS[1])}: use the tokenizer.json of the model's repo")
        self._tokenizer.post_processor = TemplateProcessing(
            single=f"{bos}:0 $A:0 {eos}:0",
            pair=f"{bos}:0 $A:0 {eos}:1 $B:1",
            special_tokens=[(bos, bos_id), (eos, eos_id)],
        )
        self.speaker_space = speaker_space
        self.vocab_size = self._tokenizer.get_vocab_size()

    def encode(self, text: str, speaker: int) -> List[int]:
        """Token ids of one turn, framed as the model was trained."""
        if self.speaker_space:
            return self._tokenizer.encode(f"[{speaker}] {text.lstrip()}").ids
        return self._tokenizer.encode(f"[{speaker}]{text}").ids
