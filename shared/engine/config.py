"""Model hyperparameters (named as in Hugging Face `config.json`) and engine settings."""

from dataclasses import dataclass, field

# how draft tokens are proposed (shared/engine/speculative); "draft" runs `EngineConfig.draft_model`
SPECULATIVE_METHODS = ("none", "ngram", "suffix", "draft")
DRAFT_LENGTHS = ("adaptive", "fixed")  # by a cost model and acceptance rates; or always all that is proposed
QUANTIZATIONS = ("auto", "none", "q8_0", "q4_0")  # weights in block formats (shared/engine/quant.py)
QUANTIZATION_HELP = (
    "weights in block formats run by integer CPU kernels: auto keeps a GGUF's own (Q8_0, Q4_0, Q4_1), "
    "q8_0 and q4_0 quantize the projections at load, none runs them in fp"
)


def speculation_problem(speculative: str, draft_model: str | None) -> str | None:
    """What is wrong with a speculative method and a draft model given together (None: nothing)."""
    if speculative == "draft" and not draft_model:
        return "--speculative draft needs --draft-model (a smaller model with the target's tokenizer)"
    if draft_model and speculative != "draft":
        return f"--draft-model is for --speculative draft, not {speculative!r}"
    return None


@dataclass
class ModelConfig:
    architecture: str  # "llama" | "qwen2" | "qwen3" | "mixtral" | "qwen2_moe" | "qwen3_moe" (a LLaVA's text model's)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF dict: {"rope_type": "llama3" | "linear" | ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = "model"
    # Mixture of experts (0 experts: a dense model). A layer's MLP is sparse unless it is listed in
    # `mlp_only_layers` or its number is off the `decoder_sparse_step` (Qwen2/3-MoE's rule).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalize the top-k router weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert (0: none)
    mlp_only_layers: list[int] = field(default_factory=list)
    decoder_sparse_step: int = 1
    # Vision-language models (LLaVA): an image enters the prompt as `image_tokens` copies of `image_token_id`,
    # whose embeddings the vision encoder's output replaces (0: a text-only model).
    image_token_id: int | None = None
    image_tokens: int = 0

    def is_moe_layer(self, index: int) -> bool:
        return (
            self.num_experts > 0 and index not in self.mlp_only_layers and (index + 1) % self.decoder_sparse_step == 0
        )


@dataclass
class EngineConfig:
    model: str = "smollm2"
    device: str = "cpu"
    dtype: str = "auto"  # fp32 on CPU (no native bf16 here); bf16 on CUDA
    block_size: int = 16
    quantization: str = "auto"  # one of QUANTIZATIONS
    kv_cache_memory: int | None = None  # bytes; None = a fraction of free memory
    kv_cache_fraction: float = 0.25
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    step_slo_ms: float | None = None  # TPOT target: the step token budget adapts to it (engine/step_budget.py)
    min_num_batched_tokens: int = 64  # the adapted budget's floor
    max_model_len: int | None = None  # None = the model's context length
    max_encoder_tokens: int | None = None  # image tokens encoded a step (None: max_num_batched_tokens)
    enable_prefix_caching: bool = True
    kv_host_memory: int | None = None  # bytes of a second KV tier evicted blocks go down to (shared/engine/kv_tier.py)
    kv_host_path: str | None = None  # directory of its file on a CPU host (None: the system's temporary directory)
    num_threads: int | None = None  # torch intra-op threads; None = leave torch's default
    seed: int = 0
    speculative: str = "none"  # one of SPECULATIVE_METHODS
    num_speculative_tokens: int = 5  # the most draft tokens a sequence scores per step
    draft_length: str = "adaptive"  # one of DRAFT_LENGTHS
    draft_model: str | None = None  # speculative="draft": a smaller model with the same tokenizer (GGUF, folder, name)
    expert_parallel: int = 1  # processes a MoE model's experts are split over (shared/engine/expert_parallel.py)
    num_redundant_experts: int = 0  # extra expert slots per MoE layer, for copies of hot experts
    expert_parallel_address: str | None = None  # HOST:PORT to meet ranks started on other hosts; None: start here
    enable_eplb: bool = False  # rebalance experts over the group while serving (shared/engine/expert_balancer.py)
    eplb_interval_steps: int = 32  # steps between load samples (and rebalancing decisions)
    cost_profile: str | None = None  # a file `xllm profile` wrote: seeds the step-cost fit (shared/cost_model.py)
    offline_slowdown: float = 0.1  # beside online work, offline sequences may make a step this much slower
    offline_step_ms: float = 200.0  # alone, offline work makes steps of at most this (an online arrival's wait)

    def __post_init__(self):
        problem = speculation_problem(self.speculative, self.draft_model)
        if problem:
            raise ValueError(problem)
