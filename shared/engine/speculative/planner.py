"""How many draft tokens each sequence gets this step: the lengths that maximize expected output tokens
per second, from a cost model of this engine's step time and each sequence's acceptance rate.

A sequence whose drafts keep being rejected, or a batch so large that scoring more tokens costs as much
as it brings, gets none: speculation switches itself off, and back on when that changes.
"""

import bisect

# A sequence's acceptance estimate moves this far toward each new outcome; when it is not drafting, it
# drifts back toward its method's average this fast, so it gets tried again later.
ACCEPTANCE_RATE = 0.3
ACCEPTANCE_DRIFT = 0.05
COST_RATE = 0.1  # how fast the cost model follows observed step times


class StepCost:
    """Seconds per engine step as a function of the tokens it scores: piecewise linear through measured
    points, corrected online by the steps actually run."""

    def __init__(self, points: dict[int, float]):
        self.sizes = sorted(points)
        self.seconds = [points[n] for n in self.sizes]

    def __call__(self, tokens: int) -> float:
        i = min(max(bisect.bisect_left(self.sizes, tokens), 1), len(self.sizes) - 1)
        lo, hi = self.sizes[i - 1], self.sizes[i]
        slope = (self.seconds[i] - self.seconds[i - 1]) / (hi - lo)
        return max(self.seconds[i - 1] + slope * (tokens - lo), 1e-6)

    def observe(self, tokens: int, seconds: float) -> None:
        """Move the two points around `tokens` toward an observed step, each by how close it is."""
        error = seconds - self(tokens)
        i = min(max(bisect.bisect_left(self.sizes, tokens), 1), len(self.sizes) - 1)
        lo, hi = self.sizes[i - 1], self.sizes[i]
        w = min(max((tokens - lo) / (hi - lo), 0.0), 1.0)
        self.seconds[i - 1] += COST_RATE * (1 - w) * error
        self.seconds[i] += COST_RATE * w * error


def plan_draft_lengths(
    available: list[int],
    acceptance: list[float],
    num_decodes: int,
    base_tokens: int,
    cost: StepCost,
    draft_cost: StepCost | None = None,
    catch_up: list[int] | None = None,
) -> list[int]:
    """Draft tokens to score for each candidate, of the `available[i]` it can have.

    The j-th draft token of a sequence with acceptance rate a adds a**j expected output tokens and one
    scored token. Taking draft tokens by expected gain, keep the prefix with the best expected output
    tokens per second (each decode emits one token without drafts). With a draft model (`draft_cost`:
    seconds of one of its passes by tokens), the j-th draft token of a sequence is also a row of the draft's
    j-th pass, whose cost is added to the step's; the first is `catch_up[i]` rows (the tokens the draft
    has not computed yet, which it must before it drafts: a sequence that has not drafted for a while, or
    never, costs more to start)."""
    gains = sorted(
        ((a ** (j + 1), i) for i, (n, a) in enumerate(zip(available, acceptance)) for j in range(n)),
        key=lambda gain: (-gain[0], gain[1]),
    )
    emitted, tokens, draft_seconds = float(num_decodes), base_tokens, 0.0
    lengths, pass_rows = [0] * len(available), [0] * (max(available, default=0) + 1)
    best_rate, best_count = emitted / cost(tokens), 0
    for count, (gain, i) in enumerate(gains, 1):
        emitted, tokens = emitted + gain, tokens + 1
        if draft_cost is not None:  # more rows in the draft pass this token comes out of
            rows, more = pass_rows[lengths[i]], catch_up[i] if catch_up and not lengths[i] else 1
            draft_seconds += draft_cost(rows + more) - (draft_cost(rows) if rows else 0.0)
            pass_rows[lengths[i]] += more
        lengths[i] += 1
        if emitted / (cost(tokens) + draft_seconds) > best_rate:
            best_rate, best_count = emitted / (cost(tokens) + draft_seconds), count
    lengths = [0] * len(available)
    for _, i in gains[:best_count]:
        lengths[i] += 1
    return lengths


class Acceptance:
    """Per-token acceptance: one estimate per sequence (seeded with its method's average) and the
    method's average over every verified position."""

    def __init__(self, prior: float = 0.5):
        self.average = prior
        self.by_seq: dict[int, float] = {}

    def of(self, seq_id: int) -> float:
        return self.by_seq.get(seq_id, self.average)

    def record(self, seq_id: int, drafted: int, accepted: int) -> None:
        """Positions up to the first rejection were verified: `accepted` ones, then a zero if one was rejected."""
        outcomes = [1.0] * accepted + ([0.0] if accepted < drafted else [])
        estimate = self.of(seq_id)
        for outcome in outcomes:
            estimate += ACCEPTANCE_RATE * (outcome - estimate)
            self.average += ACCEPTANCE_RATE * 0.1 * (outcome - self.average)
        self.by_seq[seq_id] = estimate

    def idle(self, seq_id: int) -> None:
        """The sequence drafted nothing this step: its estimate drifts back toward the average."""
        if seq_id in self.by_seq:
            self.by_seq[seq_id] += ACCEPTANCE_DRIFT * (self.average - self.by_seq[seq_id])

    def forget(self, seq_id: int) -> None:
        self.by_seq.pop(seq_id, None)
