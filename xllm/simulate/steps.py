"""What the simulated engine schedules: a request's sequence on one instance, and a step (or a run of decode-only
steps priced in closed form)."""

import math
from dataclasses import dataclass, field

WAITING, PREFILL, DECODE, DONE = range(4)
MIN_STEP_S = 1e-6
MAX_RUN_STEPS = 1 << 20


@dataclass(eq=False)
class Seq:
    """A request's sequence on one instance. A split's prefill part has `handoff` (it stops at the first token);
    its decode part arrives with the prompt computed and one token generated."""

    rid: int  # the request's arrival order, also its scheduling order
    prompt: int
    max_tokens: int  # tokens to generate in all
    tokens: int = 0  # prompt + generated (the engine's num_tokens); 0: the prompt
    computed: int = 0
    generated: int = 0
    handoff: bool = False
    state: int = WAITING
    alloc: int = 0  # KV tokens allocated while prefilling
    epoch: int = 0  # bumped on every state change, to drop stale finish entries
    base_tick: int = 0  # as a decode: the instance tick, tokens and generated count when it joined
    base_tokens: int = 0
    base_generated: int = 0

    def __post_init__(self) -> None:
        self.tokens = self.tokens or self.prompt

    @property
    def imported(self) -> bool:
        """Waiting with only its next token to compute: a decode (how shared/engine/load.py counts it)."""
        return self.computed > 0 and self.tokens - self.computed <= 1


@dataclass
class Step:
    """A step, or a run of `k` decode-only steps whose i-th lasts c0 + c1 x i."""

    start: float
    decodes: int
    chunks: list[tuple[Seq, int]] = field(default_factory=list)
    k: int = 1
    c0: float = 0.0
    c1: float = 0.0

    def elapsed(self, j: int) -> float:
        """Seconds the first j steps take."""
        return j * self.c0 + self.c1 * j * (j - 1) / 2

    @property
    def end(self) -> float:
        return self.start + self.elapsed(self.k)

    def done_by(self, t: float) -> int:
        """Steps completed by time t."""
        e = t - self.start
        if e <= 0:
            return 0
        if self.c1 <= 0:
            j = int(e / self.c0)
        else:
            b = self.c0 - self.c1 / 2
            j = int((-b + math.sqrt(b * b + 2 * self.c1 * e)) / self.c1)
        while j > 0 and self.elapsed(j) > e:
            j -= 1
        while j < self.k and self.elapsed(j + 1) <= e:
            j += 1
        return min(j, self.k)
