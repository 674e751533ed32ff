"""In-process offline generation: `LLM(config).generate(prompts, params)`."""

import uuid
from dataclasses import dataclass, field

from shared.engine.config import EngineConfig
from shared.engine.llm_engine import LLMEngine
from shared.engine.loader import Checkpoint
from shared.engine.sampling_params import SamplingParams


@dataclass
class CompletionSeq:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionSeq]
    cached_tokens: int = 0


class LLM:
    def __init__(self, config: EngineConfig | None = None, checkpoint: Checkpoint | None = None, **kw):
        self.engine = LLMEngine(config or EngineConfig(**kw), checkpoint)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams], chat: bool = False
    ) -> list[Completion]:
        """Prompts as text (templated as a single user turn when `chat`) or as token ids."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, Completion] = {}
        order = []
        for prompt, p in zip(prompts, params_list):
            ids = self.encode(prompt, chat) if isinstance(prompt, str) else list(prompt)
            rid = uuid.uuid4().hex
            self.engine.validate(ids, p)  # this in-process API is a boundary: raises InvalidRequestError
            self.engine.add_request(rid, ids, p)
            results[rid] = Completion(rid, ids, [CompletionSeq(i) for i in range(p.n)])
            order.append(rid)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                completion = results[out.request_id]
                completion.cached_tokens = out.cached_tokens
                for d in out.outputs:
                    seq = completion.outputs[d.index]
                    seq.text += d.text
                    seq.token_ids += d.token_ids
                    seq.logprobs += d.logprobs or []
                    seq.finish_reason = d.finish_reason or seq.finish_reason
        return [results[rid] for rid in order]

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if chat:
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)
