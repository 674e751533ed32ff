"""The engine: step() = schedule -> run the model -> sample -> post-process.

Requests come in as token ids (the gateway templates and tokenizes), go out as per-step deltas of
tokens, text and logprobs. `LLM` on top gives the in-process `generate(prompts, params)`.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shared.engine.block_manager import BlockManager, KvEventHook
from shared.engine.config import EngineConfig
from shared.engine.errors import InvalidRequestError
from shared.engine.loader import Checkpoint, load_checkpoint
from shared.engine.model import CausalLM
from shared.engine.model_runner import ModelRunner
from shared.engine.sampler import sample
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import Scheduler
from shared.engine.sequence import Sequence, SequenceStatus
from shared.engine.stop_checker import StopChecker
from shared.engine.system import default_dtype, kv_cache_bytes


@dataclass
class SeqDelta:
    index: int
    token_ids: list[int]
    text: str
    logprobs: list | None = None  # per token: (logprob, [(token_id, logprob), ...])
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[SeqDelta]
    finished: bool
    prompt_tokens: int
    cached_tokens: int
    held: bool = False  # prefill role: the request stops here, its KV waits for the hand-off


@dataclass
class Continuation:
    """One unfinished sequence of a prefilled request, as the decode worker takes it over."""

    index: int
    token_id: int  # the first token, sampled by the prefill worker
    rng_state: bytes | None = None  # the seeded sampler's state after that token


@dataclass
class _Request:
    request_id: str
    seqs: list[Sequence]
    n: int
    finished: set[int] = field(default_factory=set)


class LLMEngine:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint | None = None,
                 on_kv_event: KvEventHook | None = None):
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = default_dtype(config.dtype, self.device)
        ckpt = checkpoint or load_checkpoint(config.model)
        self.model_config = ckpt.config
        self.tokenizer = ckpt.tokenizer
        self.generation_defaults = ckpt.generation_defaults
        self.max_model_len = min(config.max_model_len or ckpt.config.max_position_embeddings,
                                 ckpt.config.max_position_embeddings)
        self.model = model = CausalLM.build(ckpt.config, ckpt.weights, self.max_model_len, self.device,
                                            self.dtype)
        block_bytes = ModelRunner.block_bytes(model.config, config.block_size, self.dtype)
        num_blocks = max(2, kv_cache_bytes(config, self.device) // block_bytes)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                          on_kv_event)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, config.block_size, self.device, self.dtype)
        self.eos_token_ids = list(ckpt.config.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self.held: dict[str, _Request] = {}  # prefill role: prefilled requests awaiting hand-off
        self.importing: dict[str, Sequence] = {}  # decode role: blocks reserved, KV being written

    # ---- requests -----------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError for a request this engine cannot run (`params` checked themselves when
        they were made); reads only limits fixed at start."""
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        vocab = self.model_config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        max_tokens = params.max_tokens or 1
        if len(prompt_token_ids) + max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the request "
                f"has {len(prompt_token_ids)} prompt tokens and asks for {max_tokens} more", "max_tokens")
        if params.n > self.config.max_num_seqs:
            raise InvalidRequestError(f"n must be <= {self.config.max_num_seqs}", "n")
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"{name} must hold token ids in [0, {vocab})", name)
        need = -(-(len(prompt_token_ids) + max_tokens) // self.config.block_size)
        if need > self.block_manager.num_blocks:
            raise InvalidRequestError(f"the request needs {need} KV blocks; the cache has "
                                      f"{self.block_manager.num_blocks}", "max_tokens")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, arrival: float | None = None) -> None:
        """Queue a request its caller has validated (`validate`: the worker for the bus, `LLM` in-process)."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        seq = self._new_seq(request_id, prompt_token_ids, params, 0, priority,
                            time.monotonic() if arrival is None else arrival)
        self.requests[request_id] = _Request(request_id, [seq], params.n)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its blocks at once. False if it is not here."""
        if request_id in self.held:
            self.release_held(request_id)
            return True
        if request_id in self.importing:
            self.block_manager.free(self.importing.pop(request_id))
            return True
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- prefill -> decode hand-off -------------------------------------------------------------
    def add_prefill_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                            priority: int = 0,
                            kv_sink: Callable[[int, list[int]], None] | None = None) -> None:
        """Prefill role: compute the prompt's KV and sample each sequence's first token, as any
        request does; then the request stops here (its output has `held` set) and its blocks wait
        for `held_blocks` / `continuations` until `release_held`. A request whose every sequence
        finished on its first token is not held: it is simply finished. `kv_sink(layer, block_ids)`
        is called after each layer of the prompt's last step, so the KV can leave while later
        layers compute."""
        self.add_request(request_id, prompt_token_ids, params, priority)
        seq = self.requests[request_id].seqs[0]
        seq.prefill_only, seq.kv_sink = True, kv_sink

    def _hold(self, request: _Request) -> None:
        """A prefill-only request has sampled: keep its prompt blocks for the hand-off."""
        carrier = request.seqs[0]  # the only one with blocks: its siblings only sampled here
        self.scheduler.running.remove(carrier)
        self.requests.pop(request.request_id, None)
        for seq in request.seqs:
            seq.status = SequenceStatus.FINISHED
        if len(request.finished) == request.n:
            self.block_manager.free(carrier)
        else:
            self.held[request.request_id] = request

    def held_blocks(self, request_id: str) -> tuple[list[int], int]:
        """Blocks of a held prefill and the number of tokens whose KV they hold (the prompt's)."""
        carrier = self.held[request_id].seqs[0]
        return list(carrier.block_table), carrier.num_computed_tokens

    def continuations(self, request_id: str) -> list[Continuation]:
        """What the decode worker needs to go on with each unfinished sequence of a held request."""
        request = self.held[request_id]
        return [Continuation(seq.index, seq.token_ids[-1], _rng_state(seq.generator))
                for seq in request.seqs if seq.index not in request.finished]

    def release_held(self, request_id: str) -> None:
        """The decode worker has the KV: free the blocks (they stay in the prefix cache)."""
        request = self.held.pop(request_id, None)
        if request is not None:
            self.block_manager.free(request.seqs[0])

    def reserve_import(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       priority: int = 0) -> list[int] | None:
        """Decode role: blocks for the prompt's KV, to be written by the caller
        (ModelRunner.write_blocks) before `commit_import`. None when there is no room."""
        if request_id in self.requests or request_id in self.importing:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        seq = self._new_seq(request_id, prompt_token_ids, params, 0, priority, time.monotonic())
        if not self.block_manager.allocate(seq, seq.num_tokens):
            self.block_manager.free(seq)
            return None
        seq.num_computed_tokens = seq.num_tokens
        seq.imported = True
        self.importing[request_id] = seq
        return list(seq.block_table)

    def commit_import(self, request_id: str, continuations: list[Continuation]) -> None:
        """The prompt's KV is in place: each sequence goes on from its first token (siblings share
        the carrier's prompt blocks, copying only the partial last one). Continuations that do not
        fit the request are refused (InvalidRequestError) and its blocks freed."""
        carrier = self.importing.pop(request_id)
        prompt, n = list(carrier.token_ids), carrier.params.n
        indices = [c.index for c in continuations]
        state_size = len(_rng_state(carrier.generator) or b"")  # another device type's state differs
        if (not continuations or len(set(indices)) != len(indices) or not set(indices) <= set(range(n))
                or not all(0 <= c.token_id < self.model_config.vocab_size for c in continuations)
                or any(len(c.rng_state or b"") != state_size for c in continuations)):
            self.block_manager.free(carrier)
            raise InvalidRequestError(f"sequences {continuations} do not fit the request (n={n})")
        carrier.index = continuations[0].index
        request = _Request(request_id, [], n, set(range(n)) - {c.index for c in continuations})
        for cont in continuations:
            seq = carrier
            if cont is not continuations[0]:
                seq = self._new_seq(request_id, prompt, carrier.params, cont.index,
                                    carrier.priority, carrier.arrival)
                seq.imported = self._fork_blocks(carrier, seq)  # else it recomputes its prompt
            seq.num_forks = 0
            seq.token_ids.append(cont.token_id)
            seq.stop_checker.append(cont.token_id)  # it did not finish there, so it does not here
            seq.stop_checker.new_text(finished=False)  # the prefill worker streamed this text
            if cont.rng_state is not None and seq.generator is not None:
                seq.generator.set_state(torch.frombuffer(bytearray(cont.rng_state), dtype=torch.uint8))
            request.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = request

    def _fork_blocks(self, parent: Sequence, child: Sequence) -> bool:
        """Share the parent's computed blocks with a child, copying only the partial last one;
        False (nothing shared) when there is no block to copy into."""
        if self.block_manager.num_free_blocks < 1:
            return False
        partial = self.block_manager.fork(parent, child)
        if partial is not None:
            self.runner.copy_block(parent.block_table[len(child.block_table) - 1], partial)
        return True

    def _new_seq(self, request_id: str, prompt: list[int], params: SamplingParams, index: int,
                 priority: int, arrival: float) -> Sequence:
        seq = Sequence(request_id, prompt, params, index, priority, arrival)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
        seq.stop_checker = StopChecker(seq, self.tokenizer, self.eos_token_ids, self.max_model_len)
        return seq

    # ---- the step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        sinks = [s.seq for s in batch if s.seq.kv_sink is not None and s.samples]  # prompts ending now
        after_layer = (lambda i: [seq.kv_sink(i, seq.block_table) for seq in sinks]) if sinks else None
        logits, sampling = self.runner.run(batch, after_layer)
        for s in batch:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.cache_full_blocks(s.seq)
        logits, sampling = self._fork_siblings(logits, sampling)
        if not sampling:
            return []
        sampled = sample(logits, sampling, self.eos_token_ids)
        deltas: dict[str, list[SeqDelta]] = {}
        for seq, token, logprob in zip(sampling, sampled.token_ids, sampled.logprobs):
            seq.token_ids.append(token)
            reason = seq.stop_checker.append(token)
            if reason:
                seq.finish_reason = reason
                if not seq.prefill_only:  # a held request's blocks are freed with it
                    self.scheduler.finish(seq)
            text = seq.stop_checker.new_text(finished=reason is not None)
            deltas.setdefault(seq.request_id, []).append(
                SeqDelta(seq.index, [token], text, [logprob] if logprob else None, reason))
        outputs = []
        for rid, seq_deltas in deltas.items():
            request = self.requests[rid]
            outputs.append(out := self._request_output(request, seq_deltas))
            if request.seqs[0].prefill_only:
                out.held = not out.finished
                self._hold(request)
        return outputs

    def _fork_siblings(self, logits: torch.Tensor, sampling: list[Sequence]):
        """n > 1: when the first sequence of a request finishes its prompt, its siblings share its
        prompt blocks (copying only the partial last one) and sample from the same logits."""
        extra_rows, children = [], []
        for row, seq in enumerate(sampling):
            if not seq.num_forks:
                continue
            request = self.requests[seq.request_id]
            for index in range(1, seq.num_forks + 1):
                child = self._new_seq(seq.request_id, seq.token_ids, seq.params, index, seq.priority,
                                      seq.arrival)
                child.num_cached_tokens = seq.num_cached_tokens
                request.seqs.append(child)
                if seq.prefill_only:  # it only samples here: the decode worker forks the blocks
                    child.prefill_only = True
                elif not self._fork_blocks(seq, child):  # no room to copy: recompute it later
                    self.scheduler.add(child)
                    continue
                else:
                    self.scheduler.start(child)
                extra_rows.append(row)
                children.append(child)
            seq.num_forks = 0
        if children:
            logits = torch.cat([logits, logits[extra_rows]])
        return logits, sampling + children

    def _request_output(self, request: _Request, deltas: list[SeqDelta]) -> RequestOutput:
        request.finished.update(d.index for d in deltas if d.finish_reason)
        finished = len(request.finished) == request.n
        if finished:
            self.requests.pop(request.request_id, None)
        first = request.seqs[0]
        return RequestOutput(request.request_id, deltas, finished, first.num_prompt_tokens,
                             first.num_cached_tokens)

    # ---- stats --------------------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "free_blocks": bm.num_free_blocks,
            "total_blocks": bm.num_blocks,
            "prefix_queries": bm.prefix_queries,
            "prefix_hits": bm.prefix_hits,
            "preemptions": self.scheduler.num_preemptions,
        }


def _rng_state(generator: torch.Generator | None) -> bytes | None:
    return None if generator is None else generator.get_state().numpy().tobytes()
