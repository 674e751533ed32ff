"""Prompt lookup (n-gram) drafts: find the sequence's last n tokens earlier in its prompt or output and
propose what followed them there. Needs no weights; pays on text that repeats (code edits, quotes,
extraction).
"""


class NgramIndex:
    """Where each n-gram (n in [min_n, max_n]) of one sequence last occurred, kept up to date as tokens
    are appended: a lookup is a dict access, not a scan of the whole context."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.follows: dict[tuple[int, ...], int] = {}  # n-gram -> position of the token after its latest match
        self.num_indexed = 0  # tokens[:num_indexed] are in the index

    def extend(self, tokens: list[int]) -> None:
        # the n-gram ending just before position p is registered when token p exists to follow it
        for p in range(max(self.num_indexed, 1), len(tokens)):
            for n in range(self.min_n, min(self.max_n, p) + 1):
                self.follows[tuple(tokens[p - n : p])] = p
        self.num_indexed = len(tokens)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens following the longest earlier match of the context's tail."""
        self.extend(tokens)
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            start = self.follows.get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + k]
        return []


class NgramProposer:
    method = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 4):
        self.min_n, self.max_n = min_n, max_n
        self.indexes: dict[int, NgramIndex] = {}  # by seq_id

    def propose(self, seq, k: int) -> list[int]:
        index = self.indexes.get(seq.seq_id)
        if index is None:
            index = self.indexes[seq.seq_id] = NgramIndex(self.min_n, self.max_n)
        return index.propose(seq.token_ids, k)

    def finished(self, seq) -> None:
        self.indexes.pop(seq.seq_id, None)
