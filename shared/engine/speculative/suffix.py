"""Suffix decoding (arXiv 2411.04975): drafts from what followed the context's longest suffix, in the
sequence's own prompt and output and in this worker's recent outputs, each draft token scored by how
often it followed there. Pays on agentic and repetitive work, where answers repeat earlier answers.

A `SuffixIndex` counts, for every context of up to `depth` tokens, the tokens that followed it: the
paths of a suffix tree of bounded depth, kept as a flat dict. The worker-wide index holds the last
`max_outputs` outputs and forgets the oldest (its counts are taken back out).
"""

from collections import Counter, deque


class SuffixIndex:
    def __init__(self, depth: int):
        self.depth = depth
        self.next_tokens: dict[tuple[int, ...], Counter] = {}

    def add(self, tokens: list[int], start: int = 1, sign: int = 1) -> None:
        """Count the token at each position p >= start after each of its contexts of 1..depth tokens."""
        for p in range(max(start, 1), len(tokens)):
            token = tokens[p]
            for n in range(1, min(self.depth, p) + 1):
                context = tuple(tokens[p - n : p])
                counts = self.next_tokens.get(context)
                if counts is None:
                    counts = self.next_tokens[context] = Counter()
                counts[token] += sign
                if counts[token] <= 0:
                    del counts[token]
                    if not counts:
                        del self.next_tokens[context]

    def remove(self, tokens: list[int], start: int = 1) -> None:
        self.add(tokens, start, sign=-1)

    def draft(self, tokens: list[int], k: int, min_prob: float) -> tuple[list[int], float]:
        """Up to k tokens, each the likeliest follower of the longest context found, while the product
        of their frequencies stays >= min_prob; and the expected number of them accepted (the sum of
        those products)."""
        context = list(tokens[-self.depth :])
        draft: list[int] = []
        prob, expected = 1.0, 0.0
        while len(draft) < k:
            counts = self._longest_match(context)
            if counts is None:
                break
            token, count = max(counts.items(), key=lambda item: item[1])
            prob *= count / sum(counts.values())
            if prob < min_prob:
                break
            draft.append(token)
            expected += prob
            context = (context + [token])[-self.depth :]
        return draft, expected

    def _longest_match(self, context: list[int]) -> Counter | None:
        for n in range(len(context), 0, -1):
            counts = self.next_tokens.get(tuple(context[-n:]))
            if counts:
                return counts
        return None


class SuffixProposer:
    method = "suffix"

    def __init__(self, depth: int = 8, max_outputs: int = 256, min_prob: float = 0.1):
        self.depth, self.min_prob = depth, min_prob
        self.recent = SuffixIndex(depth)  # this worker's recent outputs
        self.outputs: deque[tuple[list[int], int]] = deque()  # (prompt tail + output, where the output starts)
        self.max_outputs = max_outputs
        self.per_seq: dict[int, tuple[SuffixIndex, list[int]]] = {}  # seq_id -> (index, its indexed length)

    def propose(self, seq, k: int) -> list[int]:
        own, indexed = self.per_seq.get(seq.seq_id, (None, 0))
        if own is None:
            own = SuffixIndex(self.depth)
        # the context's own tail is a match only once a token follows it: index up to the last token
        own.add(seq.token_ids, start=indexed)
        self.per_seq[seq.seq_id] = (own, seq.num_tokens)
        candidates = [own.draft(seq.token_ids, k, self.min_prob), self.recent.draft(seq.token_ids, k, self.min_prob)]
        draft, _ = max(candidates, key=lambda candidate: candidate[1])
        return draft

    def finished(self, seq) -> None:
        """Keep a finished sequence's output (with the prompt's tail for context) for later requests."""
        self.per_seq.pop(seq.seq_id, None)
        if seq.num_output_tokens < 2:
            return
        tail = min(self.depth, seq.num_prompt_tokens)
        entry = (seq.token_ids[seq.num_prompt_tokens - tail :], tail)
        self.recent.add(*entry)
        self.outputs.append(entry)
        if len(self.outputs) > self.max_outputs:
            self.recent.remove(*self.outputs.popleft())
