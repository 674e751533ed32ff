"""Per sequence: detokenize new tokens, decide whether the sequence stops, and what text to emit.

Stop strings may span token boundaries, so while a sequence has stop strings the last
(longest stop - 1) characters are held back: streamed text then always equals the final text.
"""

from shared.engine.detokenizer import IncrementalDetokenizer
from shared.engine.sequence import Sequence
from shared.tokenizer import Tokenizer


class StopChecker:
    def __init__(self, seq: Sequence, tokenizer: Tokenizer, eos_token_ids: list[int], max_model_len: int):
        self.seq = seq
        self.params = seq.params
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, seq.token_ids[: seq.num_prompt_tokens], seq.params.skip_special_tokens
        )
        eos = set() if seq.params.ignore_eos else set(eos_token_ids)
        self.stop_ids = eos | set(seq.params.stop_token_ids)
        self.max_model_len = max_model_len
        self.holdback = max((len(s) for s in seq.params.stop), default=1) - 1
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out

    def append(self, token_id: int) -> str | None:
        """Account for a newly appended token; returns the finish reason if the sequence stops."""
        seq, p = self.seq, self.params
        may_stop = seq.num_output_tokens >= p.min_tokens
        if may_stop and token_id in self.stop_ids:
            return self._finish("stop")  # the stop token itself is never part of the text
        self.text += self.detokenizer.step([token_id])
        if may_stop and p.stop and self._truncate_at_stop_string():
            return "stop"
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return self._finish("length")
        if seq.num_tokens >= self.max_model_len:
            return self._finish("length")
        return None

    def _finish(self, reason: str) -> str:
        self.text += self.detokenizer.flush()  # a character the model never finished
        return reason

    def _truncate_at_stop_string(self) -> bool:
        # Only the tail can hold a new match: text up to `emitted` was checked before.
        search_from = max(0, self.emitted - self.holdback)
        hits = [(i, s) for s in self.params.stop if (i := self.text.find(s, search_from)) >= 0]
        if not hits:
            return False
        i, s = min(hits)
        self.text = self.text[: i + len(s)] if self.params.include_stop_str_in_output else self.text[:i]
        return True

    def new_text(self, finished: bool) -> str:
        """Text not yet emitted; keeps the possible start of a stop string back until finished."""
        end = len(self.text) if finished or not self.params.stop else max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
