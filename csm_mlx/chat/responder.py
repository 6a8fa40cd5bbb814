"""The language model that answers in a voice chat: mlx-lm, streamed sentence by sentence.

The chat's messages are rendered with the model's chat template each turn; one prompt cache is
kept across turns and trimmed back to the tokens it shares with the new prompt, so a turn prefills
only what is new (or what changed: an answer cut short by a barge-in). When the messages outgrow
max_context_tokens the oldest exchanges are dropped, down to three quarters of it (the system
prompt stays).
"""

import re
from typing import Dict, Iterator, List, Optional

from .. import hub
from ..text import split_sentences

DEFAULT_LANGUAGE_MODEL = "mlx-community/Llama-3.2-1B-Instruct-4bit"
DEFAULT_SYSTEM = ("You are a warm, helpful voice assistant in a spoken conversation. Answer in one to three short "
                  "sentences of plain spoken English, the way people talk: no lists, no markdown, no emoji.")
# what mlx-lm reads from a model repo; never code (*.py): nothing fetched is executed
LANGUAGE_MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
_NOT_SPOKEN = re.compile(r"[*_#`~]+")  # markdown a text-only model writes anyway


class ResponderError(ValueError):
    """A language model that cannot be loaded; the message says what to give instead."""


class Responder:
    """A language model chatting: messages so far, and a prompt cache over them. Use it on the
    thread that does the MLX work."""

    def __init__(self, model, tokenizer, system: str = DEFAULT_SYSTEM, *, max_tokens: int = 200,
                 max_context_tokens: int = 4096, temperature: float = 0.7, seed: Optional[int] = None):
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import make_sampler

        self.model, self.tokenizer = model, tokenizer
        self.max_tokens, self.max_context_tokens = max_tokens, max_context_tokens
        self._options = dict(max_tokens=max_tokens, max_context_tokens=max_context_tokens, temperature=temperature,
                             seed=seed)
        self.messages: List[Dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self._sampler = make_sampler(temp=temperature)
        self._seed = seed
        self._cache = make_prompt_cache(model)
        self._cached: List[int] = []  # the tokens the prompt cache holds

    @classmethod
    def load(cls, name: str = DEFAULT_LANGUAGE_MODEL, system: str = DEFAULT_SYSTEM, **options) -> "Responder":
        """Any mlx-lm model: a hub id or a local directory."""
        import mlx_lm

        path = hub.resolve_model(name, LANGUAGE_MODEL_FILES, "language model")
        try:
            model, tokenizer = mlx_lm.load(str(path))
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise ResponderError(f"language model {name} does not load with mlx-lm ({' '.join(str(e).split())})") from None
        return cls(model, tokenizer, system, **options)

    def copy(self, system: str) -> "Responder":
        """A new chat over the same model and settings, with this system prompt."""
        return Responder(self.model, self.tokenizer, system, **self._options)

    def reply(self, user_text: str) -> Iterator[Optional[str]]:
        """Answer user_text: yields None after each token that completes no sentence, and each
        sentence (markdown removed) as soon as it is complete, so that speaking can start at the first.
        The answer joins the messages as it grows; stopping early keeps what was generated."""
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.models.cache import trim_prompt_cache

        self.messages.append({"role": "user", "content": user_text})
        tokens = self._prompt()
        shared = 0
        for cached, token in zip(self._cached, tokens):
            if cached != token:
                break
            shared += 1
        shared = min(shared, len(tokens) - 1)  # at least one token goes in
        trim_prompt_cache(self._cache, len(self._cached) - shared)
        answer = {"role": "assistant", "content": ""}
        self.messages.append(answer)
        generated: List[int] = []
        pending = ""
        if self._seed is not None:
            mx.random.seed(self._seed)
        try:
            for response in stream_generate(self.model, self.tokenizer, tokens[shared:], max_tokens=self.max_tokens,
                                            sampler=self._sampler, prompt_cache=self._cache):
                generated.append(response.token)
                answer["content"] += response.text
                pending += response.text
                sentences = [s for s in map(_spoken, split_sentences(pending)) if s]
                if len(sentences) > 1:  # the last may still grow
                    for sentence in sentences[:-1]:
                        yield sentence
                    pending = sentences[-1]
                else:
                    yield None
            yield from (s for s in map(_spoken, split_sentences(pending)) if s)
        finally:
            self._cached = (tokens + generated)[: self._cache[0].offset]
            answer["content"] = answer["content"].strip()

    def heard(self, text: str) -> None:
        """Cut the last answer to what the user heard of it (a barge-in); nothing heard drops it."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            if text.strip():
                self.messages[-1]["content"] = text.strip()
            else:
                self.messages.pop()

    def _prompt(self) -> List[int]:
        """The messages as the model reads them. Past the budget the oldest exchanges are dropped
        down to three quarters of it: dropping changes the prompt's start, so the whole prompt is
        prefilled again, and the headroom lets the next turns extend the kept cache instead."""
        budget = self.max_context_tokens - self.max_tokens
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        tokens = self._render()
        if len(tokens) <= budget:
            return tokens
        while len(tokens) > budget * 3 // 4 and len(self.messages) - first > 1:
            del self.messages[first]
            # an exchange goes whole: some chat templates refuse a conversation that opens with the assistant
            while len(self.messages) - first > 1 and self.messages[first]["role"] == "assistant":
                del self.messages[first]
            tokens = self._render()
        return tokens

    def _render(self) -> List[int]:
        tokens = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, enable_thinking=False)
        return list(tokens["input_ids"] if isinstance(tokens, dict) else tokens)


def _spoken(sentence: str) -> str:
    """The sentence as words to speak: no markdown, no control or undecodable characters."""
    sentence = "".join(c for c in _NOT_SPOKEN.sub("", sentence) if c.isprintable() and c != "\ufffd")
    return " ".join(sentence.split())
