"""The engine: step() = schedule -> run the model -> sample -> post-process.

Requests come in as token ids (the gateway templates and tokenizes), go out as per-step deltas of
tokens, text and logprobs. `LLM` on top gives the in-process `generate(prompts, params)`; the
prefill -> decode hand-off is `self.handoff` (kv_handoff.py).
"""

import time
from dataclasses import dataclass, replace

import torch

from shared.engine import quant
from shared.engine.block_manager import BlockManager, KvEventHook
from shared.engine.config import EngineConfig
from shared.engine.errors import InvalidRequestError
from shared.engine.expert_balancer import start_expert_parallel
from shared.engine.kv_handoff import Handoff
from shared.engine.kv_tier import host_tier
from shared.engine.load import Load, step_costs, step_sample
from shared.engine.loader import Checkpoint, load_checkpoint
from shared.engine.model import CausalLM
from shared.engine.model_runner import ModelRunner, split_rows
from shared.engine.multimodal import ImageInput, image_encoder_of
from shared.engine.sampler import sample
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import Scheduler
from shared.engine.sequence import Request, Sequence
from shared.engine.speculative import Speculator
from shared.engine.speculative.verify import verify_by_sampling, verify_with_probs
from shared.engine.stop_checker import StopChecker
from shared.engine.system import default_dtype, kv_cache_bytes
from shared.engine.validation import validate_request
from shared.messages import SeqOutput


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[SeqOutput]
    finished: bool
    prompt_tokens: int
    cached_tokens: int
    held: bool = False  # prefill role: the request stops here, its KV waits for the hand-off


class LLMEngine:
    def __init__(
        self, config: EngineConfig, checkpoint: Checkpoint | None = None, on_kv_event: KvEventHook | None = None
    ):
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = default_dtype(config.dtype, self.device)
        if config.expert_parallel > 1 and self.device.type != "cpu":
            raise ValueError("--expert-parallel runs on the CPU (gloo) for now: on CUDA it needs NCCL, not built yet")
        keep_blocks, quantize = quant.plan(config.quantization, self.device, self.dtype)
        ckpt = checkpoint or load_checkpoint(config.model, keep_blocks=keep_blocks)
        self.model_config = ckpt.config
        self.tokenizer = ckpt.tokenizer
        self.generation_defaults = ckpt.generation_defaults
        self.max_model_len = min(
            config.max_model_len or ckpt.config.max_position_embeddings, ckpt.config.max_position_embeddings
        )
        self.model = model = CausalLM.build(
            ckpt.config, ckpt.weights, self.max_model_len, self.device, self.dtype, keep_blocks, quantize
        )
        self.expert_balancer = None  # expert parallelism: the group and its load balancing
        if config.expert_parallel > 1:
            self.expert_balancer = start_expert_parallel(model, ckpt.path or config.model, config, self.dtype)
        block_bytes = ModelRunner.block_bytes(model.config, config.block_size, self.dtype)
        num_blocks = max(2, kv_cache_bytes(config, self.device) // block_bytes)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching, on_kv_event)
        self.handoff = Handoff(self)  # prefill -> decode: held prefills, KV imports
        self.image_encoder = image_encoder_of(ckpt, self.device, self.dtype)  # a LLaVA's tower and projector
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.handoff.imported.__contains__,
            config.max_encoder_tokens,
            self.image_encoder.needs_encoding if self.image_encoder else lambda image: False,
            lambda: self.costs.model,  # offline work beside online work is priced by it (scheduler.OfflineMeter)
            *(config.offline_slowdown, config.offline_step_ms / 1000),
            *(config.step_slo_ms and config.step_slo_ms / 1000, config.min_num_batched_tokens),
        )
        self.runner = ModelRunner(model, num_blocks, config.block_size, self.device, self.dtype, self.image_encoder)
        self.eos_token_ids = list(ckpt.config.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.busy_seconds = 0.0  # in steps: over wall time, how busy the engine is
        self.costs, self.load = step_costs(config.cost_profile), Load()  # what steps cost; the work queued
        self.block_manager.tier = host_tier(config, self.runner, self.costs)  # evicted blocks go down to it
        self.speculator = Speculator.from_config(
            config, self.max_model_len, self.runner, self.block_manager, self.tokenizer, self.eos_token_ids
        )

    def close(self) -> None:
        """Release what outlives the object: an expert-parallel group's processes."""
        if self.expert_balancer is not None:
            self.expert_balancer.close()
            self.expert_balancer = None

    # ---- requests -----------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams, images: list[ImageInput] = ()) -> None:
        """InvalidRequestError unless this engine can run the request (shared/engine/validation.py)."""
        validate_request(self, prompt_token_ids, params, images)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival: float | None = None,
        images: list[ImageInput] | None = None,
    ) -> None:
        """Queue a request its caller has validated (`validate`: the worker for the bus, `LLM` in-process)."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        arrival = time.monotonic() if arrival is None else arrival
        seq = self.new_seq(request_id, prompt_token_ids, params, 0, priority, arrival, images)
        self.requests[request_id] = Request(request_id, [seq], params.n)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its blocks at once. False if it is not here."""
        if self.handoff.abort(request_id):
            return True
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.seqs:
            if not seq.is_finished:
                self._finish(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def fork_blocks(self, parent: Sequence, child: Sequence) -> bool:
        """Share the parent's computed blocks with a child, copying only the partial last one;
        False (nothing shared) when there is no block to copy into."""
        if self.block_manager.num_free_blocks < 1:
            return False
        partial = self.block_manager.fork(parent, child)
        if partial is not None:
            self.runner.copy_block(parent.block_table[len(child.block_table) - 1], partial)
        return True

    def new_seq(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        index: int,
        priority: int,
        arrival: float,
        images: list[ImageInput] | None = None,
    ) -> Sequence:
        """A sequence with its sampler's generator and its stop checker, not queued yet."""
        seq = Sequence(request_id, prompt, params, index, priority, arrival, images)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
        seq.stop_checker = StopChecker(seq, self.tokenizer, self.eos_token_ids, self.max_model_len)
        return seq

    # ---- the step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        if self.speculator:
            sched = self.scheduler
            self.speculator.propose(sched.running, sched.waiting, sched.max_num_batched_tokens, self.max_model_len)
        batch = self.scheduler.schedule()
        if not batch:
            return []
        started, sample = time.perf_counter(), step_sample(batch)
        logits, sampling = self.runner.run(batch, self.handoff.layer_hook(batch))
        for s in batch:
            s.seq.num_computed_tokens += s.num_new_tokens - s.num_draft_tokens
            self.block_manager.cache_full_blocks(s.seq)
        first_rows, draft_logits = split_rows(logits, sampling)
        logits, sampling = self._fork_siblings(logits[first_rows], sampling)
        seq_outputs = self._sample(logits, sampling, draft_logits) if sampling else {}
        if self.speculator:
            self.speculator.observe_step(sum(s.num_new_tokens for s in batch), started)
        deltas: dict[str, list[SeqOutput]] = {}
        for seq, delta in seq_outputs.items():
            deltas.setdefault(seq.request_id, []).append(delta)
        outputs = [self._request_output(self.requests[rid], seq_deltas) for rid, seq_deltas in deltas.items()]
        self.handoff.hold(outputs)  # prefill role: those requests stop here, their KV kept for the hand-off
        if self.expert_balancer:
            self.expert_balancer.after_step()
        seconds = time.perf_counter() - started
        self.busy_seconds += seconds
        self.costs.observe(replace(sample, seconds=seconds))
        self.load = Load.of(self.scheduler, self.costs.model)
        return outputs

    def _sample(
        self, logits: torch.Tensor, sampling: list[Sequence], draft_logits: dict[int, torch.Tensor]
    ) -> dict[Sequence, SeqOutput]:
        """Sample every sequence's next token, and verify draft tokens (speculative/verify.py): drafts without
        probabilities by sampling each position as without speculation, a draft model's sampled drafts by
        standard speculative sampling."""
        draft_probs = self.speculator.draft.probs if self.speculator and self.speculator.draft else {}
        with_probs = [i for i, seq in enumerate(sampling) if seq.spec_token_ids and seq.seq_id in draft_probs]
        plain_rows = [i for i in range(len(sampling)) if i not in with_probs]
        plain = [sampling[i] for i in plain_rows]
        outputs: dict[Sequence, SeqOutput] = {}

        def emit(seq: Sequence, token: int, logprob) -> None:
            outputs[seq] = self._append(seq, token, logprob, outputs.get(seq))

        if plain:
            sampled = sample(logits[plain_rows], plain, self.eos_token_ids)
            for seq, token, logprob in zip(plain, sampled.token_ids, sampled.logprobs):
                emit(seq, token, logprob)
        accepted = verify_by_sampling([s for s in plain if s.spec_token_ids], draft_logits, self.eos_token_ids, emit)
        if with_probs:
            seqs = [sampling[i] for i in with_probs]
            accepted |= verify_with_probs(seqs, logits[with_probs], draft_logits, draft_probs, self.eos_token_ids, emit)
        for seq, count in accepted.items():
            self.speculator.record(seq, len(seq.spec_token_ids), count)
            seq.spec_token_ids = []
            if not seq.is_finished:  # the accepted drafts' KV is in place; the rejected ones' blocks go back
                seq.num_computed_tokens += count
                self.block_manager.cache_full_blocks(seq)
                self.block_manager.trim(seq)
        return outputs

    def _append(self, seq: Sequence, token: int, logprob, output: SeqOutput | None = None) -> SeqOutput:
        seq.token_ids.append(token)
        reason = seq.finish_reason = seq.stop_checker.append(token)
        if reason and not self.handoff.prefill_only(seq):  # a held request's blocks are freed with it
            self._finish(seq)
        text = seq.stop_checker.new_text(finished=reason is not None)
        if output is None:
            return SeqOutput(seq.index, [token], text, reason, [logprob] if logprob else None)
        output.token_ids.append(token)
        output.text += text
        output.finish_reason = reason
        if logprob:
            output.logprobs.append(logprob)
        return output

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if self.speculator:
            self.speculator.finished(seq)

    def _fork_siblings(self, logits: torch.Tensor, sampling: list[Sequence]):
        """n > 1: when the first sequence of a request finishes its prompt, its siblings share its
        prompt blocks (copying only the partial last one) and sample from the same logits."""
        extra_rows, children = [], []
        for row, seq in enumerate(sampling):
            if not seq.num_forks:
                continue
            request = self.requests[seq.request_id]
            for index in range(1, seq.num_forks + 1):
                child = self.new_seq(
                    seq.request_id, seq.token_ids, seq.params, index, seq.priority, seq.arrival, seq.images
                )
                child.num_cached_tokens = seq.num_cached_tokens
                request.seqs.append(child)
                if not self.handoff.prefill_only(seq):  # else it only samples here: the decode worker forks
                    if not self.fork_blocks(seq, child):  # no room to copy: recompute it later
                        self.scheduler.add(child)
                        continue
                    self.scheduler.start(child)
                extra_rows.append(row)
                children.append(child)
            seq.num_forks = 0
        if children:
            logits = torch.cat([logits, logits[extra_rows]])
        return logits, sampling + children

    def _request_output(self, request: Request, deltas: list[SeqOutput]) -> RequestOutput:
        request.finished.update(d.index for d in deltas if d.finish_reason)
        finished = len(request.finished) == request.n
        if finished:
            self.requests.pop(request.request_id, None)
        first = request.seqs[0]
        return RequestOutput(request.request_id, deltas, finished, first.num_prompt_tokens, first.num_cached_tokens)

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
            "busy_seconds": self.busy_seconds,
            "cost": self.costs.model.to_dict() if self.costs.model else {},
            "load": self.load,
            **(self.speculator.stats() if self.speculator else {}),
            **(bm.tier.stats() if bm.tier else {}),
            **(self.expert_balancer.stats() if self.expert_balancer else {}),
            **(self.image_encoder.stats() if self.image_encoder else {}),
        }
