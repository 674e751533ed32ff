"""The engine's side of the prefill -> decode hand-off (vLLM's KV connector, in small). A step consults
it twice (`layer_hook` before the forward, `hold` after sampling); the scheduler asks it which waiting
sequences keep imported KV. Prefill role: `add_prefill_request`; the request is held after its first
tokens until `export_held` (or `held_blocks`, `continuations`, `release_held`). Decode role:
`reserve_import`, the caller writes the blocks, `commit_import`. The bytes move in
services/worker/kv_transfer.py."""

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shared.engine.errors import InvalidRequestError
from shared.engine.model_runner import ModelRunner
from shared.engine.multimodal import ImageInput
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import ScheduledSeq
from shared.engine.sequence import Request, Sequence, SequenceStatus

if TYPE_CHECKING:
    from shared.engine.llm_engine import LLMEngine, RequestOutput

KvSink = Callable[[ModelRunner, int, list[int]], None]  # (runner, layer, block ids), on the engine thread


@dataclass
class Continuation:
    """One unfinished sequence of a prefilled request, as the decode worker takes it over."""

    index: int
    token_id: int  # the first token, sampled by the prefill worker
    rng_state: bytes | None = None  # the seeded sampler's state after that token


class Handoff:
    def __init__(self, engine: "LLMEngine"):
        self.engine = engine
        self.prefills: dict[str, Request] = {}  # prefill-only requests, until they sample
        self.sinks: dict[str, KvSink] = {}  # of those, where each one's KV goes as it is computed
        self.held: dict[str, Request] = {}  # prefilled requests awaiting the hand-off
        self.importing: dict[str, Sequence] = {}  # decode role: blocks reserved, KV being written
        # Sequences whose prompt KV came from a prefill worker: kept while waiting (it would be recomputed).
        # Weak: a sequence leaves with its request, whichever way it ends.
        self.imported: weakref.WeakSet[Sequence] = weakref.WeakSet()

    # ---- prefill role -------------------------------------------------------------------------
    def add_prefill_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        images: list[ImageInput] | None = None,
        kv_sink: KvSink | None = None,
    ) -> None:
        """Compute the prompt's KV and sample each sequence's first token, then hold the request (one
        whose every sequence finished on its first token is simply finished). `kv_sink(runner, layer,
        block_ids)` is called after each layer of the prompt's last step, so the KV can leave while
        later layers compute."""
        self.engine.add_request(request_id, prompt_token_ids, params, priority, images=images)
        self.prefills[request_id] = self.engine.requests[request_id]
        if kv_sink is not None:
            self.sinks[request_id] = kv_sink

    def prefill_only(self, seq: Sequence) -> bool:
        """Its request stops after its first tokens: its blocks are the hand-off's, not the scheduler's."""
        return seq.request_id in self.prefills

    def layer_hook(self, batch: list[ScheduledSeq]) -> Callable[[int], None] | None:
        """For the forward: the kv sinks of the prompts whose last step this is, after each layer."""
        sinks = [(self.sinks[s.seq.request_id], s.seq) for s in batch if s.samples and s.seq.request_id in self.sinks]
        runner = self.engine.runner
        return (lambda i: [sink(runner, i, seq.block_table) for sink, seq in sinks]) if sinks else None

    def hold(self, outputs: list["RequestOutput"]) -> None:
        """After sampling: each prefill-only request stops here, its prompt blocks kept for the hand-off
        (`held` set on its output) unless every sequence finished."""
        for out in outputs:
            if out.request_id not in self.prefills:
                continue
            request = self.prefills.pop(out.request_id)
            self.sinks.pop(out.request_id, None)
            carrier = request.seqs[0]  # the only one with blocks: its siblings only sampled here
            self.engine.scheduler.running.remove(carrier)
            self.engine.requests.pop(out.request_id, None)
            for seq in request.seqs:
                seq.status = SequenceStatus.FINISHED
            out.held = not out.finished
            if out.held:
                self.held[out.request_id] = request
            else:
                self.engine.block_manager.free(carrier)

    def held_blocks(self, request_id: str) -> tuple[list[int], int]:
        """Blocks of a held prefill and the number of tokens whose KV they hold (the prompt's)."""
        carrier = self.held[request_id].seqs[0]
        return list(carrier.block_table), carrier.num_computed_tokens

    def continuations(self, request_id: str) -> list[Continuation]:
        """What the decode worker needs to go on with each unfinished sequence of a held request."""
        request = self.held[request_id]
        return [
            Continuation(seq.index, seq.token_ids[-1], _rng_state(seq.generator))
            for seq in request.seqs
            if seq.index not in request.finished
        ]

    def export_held(self, request_id: str, write: Callable[[ModelRunner, list[int]], None]) -> list[Continuation]:
        """`write(runner, block_ids)` copies a held request's KV out; then its blocks are freed (they stay
        in the prefix cache), even when the copy fails. KeyError when it is not held (aborted)."""
        try:
            write(self.engine.runner, self.held_blocks(request_id)[0])
            return self.continuations(request_id)
        finally:
            self.release_held(request_id)

    def release_held(self, request_id: str) -> bool:
        """The decode worker has the KV: free the blocks (they stay in the prefix cache)."""
        request = self.held.pop(request_id, None)
        if request is not None:
            self.engine.block_manager.free(request.seqs[0])
        return request is not None

    # ---- decode role --------------------------------------------------------------------------
    def reserve_import(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        images: list[ImageInput] | None = None,
    ) -> list[int] | None:
        """Blocks for the prompt's KV, to be written by the caller (ModelRunner.write_kv) before
        `commit_import`. None when there is no room."""
        engine = self.engine
        if request_id in engine.requests or request_id in self.importing:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        seq = engine.new_seq(request_id, prompt_token_ids, params, 0, priority, time.monotonic(), images)
        if not engine.block_manager.allocate(seq, seq.num_tokens):
            engine.block_manager.free(seq)
            return None
        seq.num_computed_tokens = seq.num_tokens
        self.imported.add(seq)
        self.importing[request_id] = seq
        return list(seq.block_table)

    def commit_import(self, request_id: str, continuations: list[Continuation]) -> None:
        """The prompt's KV is in place: each sequence goes on from its first token (siblings share
        the carrier's prompt blocks, copying only the partial last one). Continuations that do not
        fit the request are refused (InvalidRequestError) and its blocks freed."""
        engine, carrier = self.engine, self.importing.pop(request_id)
        prompt, n = list(carrier.token_ids), carrier.params.n
        indices = [c.index for c in continuations]
        state_size = len(_rng_state(carrier.generator) or b"")  # another device type's state differs
        if (
            not continuations
            or len(set(indices)) != len(indices)
            or not set(indices) <= set(range(n))
            or not all(0 <= c.token_id < engine.model_config.vocab_size for c in continuations)
            or any(len(c.rng_state or b"") != state_size for c in continuations)
        ):
            engine.block_manager.free(carrier)
            raise InvalidRequestError(f"sequences {continuations} do not fit the request (n={n})")
        carrier.index = continuations[0].index
        request = Request(request_id, [], n, set(range(n)) - set(indices))
        for cont in continuations:
            seq = carrier
            if cont is not continuations[0]:
                seq = engine.new_seq(
                    request_id, prompt, carrier.params, cont.index, carrier.priority, carrier.arrival, carrier.images
                )
                if engine.fork_blocks(carrier, seq):  # else it recomputes its prompt
                    self.imported.add(seq)
            seq.num_forks = 0
            seq.token_ids.append(cont.token_id)
            seq.stop_checker.append(cont.token_id)  # it did not finish there, so it does not here
            seq.stop_checker.new_text(finished=False)  # the prefill worker streamed this text
            if cont.rng_state is not None and seq.generator is not None:
                seq.generator.set_state(torch.frombuffer(bytearray(cont.rng_state), dtype=torch.uint8))
            request.seqs.append(seq)
            engine.scheduler.add(seq)
        engine.requests[request_id] = request

    def abort(self, request_id: str) -> bool:
        """Drop what the hand-off keeps of a request; False when it keeps no blocks of it (a prefill
        still computing is aborted by the engine, as any request)."""
        self.prefills.pop(request_id, None)
        self.sinks.pop(request_id, None)
        seq = self.importing.pop(request_id, None)
        if seq is not None:
            self.engine.block_manager.free(seq)
        return self.release_held(request_id) or seq is not None


def _rng_state(generator: torch.Generator | None) -> bytes | None:
    return None if generator is None else generator.get_state().numpy().tobytes()
