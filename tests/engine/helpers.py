"""Small helpers shared by the engine tests."""

import torch

from shared.engine.config import EngineConfig
from shared.engine.llm_engine import LLMEngine
from shared.engine.loader import Checkpoint
from shared.engine.model_runner import ModelRunner
from shared.engine.sampling_params import SamplingParams


def make_engine(ckpt: Checkpoint, kv_blocks: int = 256, **overrides) -> LLMEngine:
    cfg = ckpt.config
    block_size = overrides.get("block_size", 16)
    block_bytes = ModelRunner.block_bytes(cfg, block_size, torch.float32)
    config = EngineConfig(model=ckpt.path, kv_cache_memory=kv_blocks * block_bytes, num_threads=1, **overrides)
    return LLMEngine(config, ckpt)


def run_all(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, dict]:
    """Add every request, step to completion; returns per request id {index: (token_ids, text, reason)}."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    results: dict[str, dict] = {rid: {} for rid in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for d in out.outputs:
                ids, text, _ = results[out.request_id].get(d.index, ([], "", None))
                results[out.request_id][d.index] = (ids + d.token_ids, text + d.text, d.finish_reason)
    return results


def greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)
