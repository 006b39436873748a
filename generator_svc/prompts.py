"""How a decoder-only LM is asked, which needs its tokenizer only.

`ChatPrompt` renders a question and the passages a row reads into the prompt's token ids: the instruction, the
passages (each cut to `max_passage_tokens`) and the question, in the tokenizer's chat template when it has one.
The generator runs these prompts (generator_svc.families.DecoderOnlyLM); the bench's one-prompt reference renders
the same prompt without loading our generator.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

# The instruction first, the passages next and the question last, so the answer is generated right after the
# question. The instruction is the same for every row, so before the passage it is part of the fixed prefix that a
# request's rows share (run once per process); after it, it ran once per passage, and RAG runs k prompts where a
# one-prompt reader runs one. Chat models keep their template's own system prompt: instruct LMs follow it best
# (tried on the demo questions).
INSTRUCTION = "Using the passage, answer the question with a short phrase."
INSTRUCTION_SEVERAL = "Using the passages, answer the question with a short phrase."
INSTRUCTION_CLOSED_BOOK = "Answer the question with a short phrase."

# One tokenizer call at a time, in every generator of the process: requests are counted in tokens on the serving
# thread while the model's thread encodes, and a fast tokenizer keeps its truncation and padding settings in shared
# state that a concurrent call with other settings changes under it (concurrent Generates to a BART failed with
# "Unable to create tensor ... padding").
_tokenizer_lock = threading.Lock()


def tokenized(tokenizer: PreTrainedTokenizerBase, text: str | list[str], **options: Any) -> Any:
    """The tokenizer's encoding of `text` (a BatchEncoding), made under the process's tokenizer lock."""
    with _tokenizer_lock:
        return tokenizer(text, **options)


class ChatPrompt:
    """The prompt of a question and the (title, text) of the passages it reads, as token ids."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, max_passage_tokens: int = 256, system_prompt: str | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.max_passage_tokens = max_passage_tokens
        self.system_prompt = system_prompt
        # A request renders and tokenizes each of its prompts twice (counted against the token limit, then run)
        # and two probe prompts per passage (where its segment ends), ~20 chat-template renderings at ~0.6 ms,
        # redone for every request over the same passages: kept by (question, passages).
        self._rendered = functools.lru_cache(maxsize=4096)(self._render)

    @property
    def template(self) -> str:
        """The chat template's content hash (what renders the prompts besides this module's wording)."""
        return hashlib.sha256(str(self.tokenizer.chat_template).encode()).hexdigest()[:16]

    def ids(self, question: str, passages: Sequence[tuple[str, str]]) -> list[int]:
        """The prompt's token ids; no passages: the closed-book prompt."""
        return list(self._rendered(question, tuple(passages)))

    def text(self, question: str, passages: Sequence[tuple[str, str]]) -> str:
        return str(self.tokenizer.decode(self.ids(question, passages)))

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's tokens as the model generates them after the prompt (no end-of-sequence)."""
        return list(tokenized(self.tokenizer, answer, add_special_tokens=False)["input_ids"])

    def _truncate(self, text: str) -> str:
        ids = tokenized(self.tokenizer, text, add_special_tokens=False)["input_ids"]
        return (
            text if len(ids) <= self.max_passage_tokens else str(self.tokenizer.decode(ids[: self.max_passage_tokens]))
        )

    def _render(self, question: str, passages: tuple[tuple[str, str], ...]) -> tuple[int, ...]:
        if not passages:
            user = f"{INSTRUCTION_CLOSED_BOOK}\nQuestion: {question}"
        elif len(passages) == 1:
            title, text = passages[0]
            user = f"{INSTRUCTION}\n\nPassage: {title}\n{self._truncate(text)}\n\nQuestion: {question}"
        else:
            numbered = "\n\n".join(
                f"Passage {i}: {title}\n{self._truncate(text)}" for i, (title, text) in enumerate(passages, 1)
            )
            user = f"{INSTRUCTION_SEVERAL}\n\n{numbered}\n\nQuestion: {question}"
        if self.tokenizer.chat_template:
            system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages = [*system, {"role": "user", "content": user}]
            text = str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        else:
            text = f"{user}\nAnswer:"
        return tuple(tokenized(self.tokenizer, text, add_special_tokens=False)["input_ids"])
