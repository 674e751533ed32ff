"""Incremental detokenization: the text each new token adds, computed from a few recent tokens.

Decoding token by token is wrong (a character can span tokens; SentencePiece spaces depend on the
neighbour) and decoding everything each step is quadratic. As vLLM and TGI do, keep two offsets into
the ids: `prefix_offset..read_offset` is text already emitted, `read_offset..` is new; decoding the
window prefix_offset.. gives the new text as what it adds to the prefix's text. A window whose text
ends in U+FFFD stops at an incomplete UTF-8 character: emit nothing until a later token completes it.
"""

from shared.tokenizer import Tokenizer

# Prompt tokens kept as context, so the first generated token decodes as it does after the prompt.
PROMPT_CONTEXT = 6
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._pieces: list[str] = []

    def step(self, new_token_ids: list[int]) -> str:
        """Text added by these tokens: empty while they end inside a multi-byte character."""
        self.ids.extend(new_token_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""
        return self._emit(full[len(prefix) :])

    def flush(self) -> str:
        """At the end of a sequence: whatever was held back (a character the model never finished)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        return self._emit(self._decode(self.ids[self.prefix_offset :])[len(prefix) :])

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _emit(self, delta: str) -> str:
        # The window moves up: what was new becomes the prefix of the next step.
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._pieces.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
