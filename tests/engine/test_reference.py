"""Our logits and greedy tokens against Hugging Face transformers on the same weights."""

import pytest
import torch

from shared.engine.loader import load_checkpoint
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import ScheduledSeq
from shared.engine.sequence import Sequence
from tests.engine.helpers import greedy, make_engine, run_all

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,", "1, 2, 3, 4,"]


def last_logits(engine, prompt_ids: list[int]) -> torch.Tensor:
    """Our logits for the prompt's last position, computed in two chunks to cover the cached path."""
    seq = Sequence("ref", prompt_ids, SamplingParams())
    bm = engine.block_manager
    assert bm.allocate(seq, len(prompt_ids))
    half = len(prompt_ids) // 2
    engine.runner.run([ScheduledSeq(seq, half)])
    seq.num_computed_tokens = half
    logits, _ = engine.runner.run([ScheduledSeq(seq, len(prompt_ids) - half)])
    bm.free(seq)
    return logits[0]


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers' own KV cache, EOS not special (like ignore_eos)."""
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def check_against(engine, model, tokenizer, prompts: list[str], n_tokens: int) -> None:
    for text in prompts:
        ids = tokenizer.encode(text)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1].float()
        ours = last_logits(engine, ids)
        rel = (ours - ref).abs().max() / ref.abs().max()
        assert rel < 1e-3, f"{text!r}: relative logit error {rel:.2e}"
        expected = hf_greedy(model, ids, n_tokens)
        got = run_all(engine, {"g": (ids, greedy(n_tokens))})["g"][0][0]
        assert got == expected, f"{text!r}: greedy tokens differ"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "llama3_rope", "llama_untied"])
def test_tiny_models_match_transformers(tiny_model_dir, arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = tiny_model_dir(arch)
    ckpt = load_checkpoint(str(path))
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    check_against(make_engine(ckpt), model, ckpt.tokenizer, PROMPTS, 32)


@pytest.mark.integration
def test_smollm2_gguf_matches_transformers(smollm2_gguf, hf_smollm2):
    ckpt = load_checkpoint(str(smollm2_gguf))
    engine = make_engine(ckpt)
    chat = [ckpt.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS[:2]]
    check_against(engine, hf_smollm2, ckpt.tokenizer, PROMPTS[:2], 32)
    # chat prompts too: the template's special tokens must encode identically
    for text in chat:
        ids = ckpt.tokenizer.encode(text, add_special_tokens=False)
        got = run_all(engine, {"c": (ids, greedy(32))})["c"][0][0]
        assert got == hf_greedy(hf_smollm2, ids, 32)


@pytest.mark.integration
def test_smollm2_logprobs_equal_log_softmax_of_reference_logits(smollm2_gguf, hf_smollm2):
    ckpt = load_checkpoint(str(smollm2_gguf))
    engine = make_engine(ckpt)
    ids = ckpt.tokenizer.encode(PROMPTS[0])
    with torch.no_grad():
        ref = torch.log_softmax(hf_smollm2(torch.tensor([ids])).logits[0, -1].float(), -1)
    engine.add_request("lp", ids, SamplingParams(temperature=0, max_tokens=1, logprobs=5))
    (out,) = [o for o in engine.step() if o.request_id == "lp"]
    token_logprob, top = out.outputs[0].logprobs[0]
    values, top_ids = ref.topk(5)
    assert [t for t, _ in top] == top_ids.tolist()
    assert torch.allclose(torch.tensor([lp for _, lp in top]), values, atol=1e-3)
    assert abs(token_logprob - ref[out.outputs[0].token_ids[0]].item()) < 1e-3
