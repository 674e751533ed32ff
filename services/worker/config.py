"""Worker settings (every engine role): `--kebab-case` flags, each also read from `XLLM_<NAME>`."""

from dataclasses import dataclass

from shared.config import opt
from shared.engine.config import (
    DRAFT_LENGTHS,
    QUANTIZATION_HELP,
    QUANTIZATIONS,
    SPECULATIVE_METHODS,
    EngineConfig,
    speculation_problem,
)
from shared.logging import LOG_LEVELS


@dataclass
class WorkerConfig:
    """An engine worker (colocated, prefill, decode or mixed role)."""

    nats: str = opt("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated")
    model: str = opt("smollm2", "GGUF file, Hugging Face folder, or a known short name")
    instance_id: str | None = opt(None, "id in the registry (default: <role>-<host>-<pid>)")
    device: str = opt("cpu", "torch device (cpu, cuda, cuda:1...)")
    dtype: str = opt("auto", "auto (fp32 on CPU, bf16 on CUDA), fp32, bf16, fp16")
    quantization: str = opt("auto", QUANTIZATION_HELP, choices=QUANTIZATIONS)
    kv_cache_memory: int | None = opt(None, "KV cache bytes (default: a fraction of free memory)", min=1)
    kv_cache_fraction: float = opt(0.1, "fraction of free memory for the KV cache", min=0.001, max=0.95)
    block_size: int = opt(16, "tokens per KV block", min=1)
    max_num_seqs: int = opt(64, "sequences running at once", min=1)
    max_num_batched_tokens: int = opt(2048, "tokens per engine step (chunked prefill budget)", min=16)
    step_slo_ms: float | None = opt(
        None,
        "TPOT target: each engine step's token budget is the most the measured step-cost model predicts keeps "
        "the step within it beside the running decodes (at most --max-num-batched-tokens)",
        min=0.1,
    )
    min_num_batched_tokens: int = opt(64, "with --step-slo-ms: the floor of the adapted token budget", min=1)
    max_model_len: int | None = opt(None, "context length (default: the model's)", min=2)
    max_encoder_tokens: int | None = opt(
        None, "image tokens encoded in one step, which stalls it (default: --max-num-batched-tokens)", min=1
    )
    enable_prefix_caching: bool = opt(True, "reuse KV of shared prompt prefixes")
    kv_host_memory: int | None = opt(
        None,
        "bytes of a second KV tier that evicted prefix blocks go down to when moving them costs less than "
        "recomputing them (pinned host memory on CUDA, a memory-mapped file on a CPU host)",
        min=1,
    )
    kv_host_path: str | None = opt(None, "directory of the second KV tier's file on a CPU host (default: temp dir)")
    num_threads: int | None = opt(None, "torch threads (default: torch's; set it when workers share cores)", min=1)
    speculative: str = opt(
        "none",
        "speculative decoding: draft tokens by n-gram lookup, suffix decoding or a draft model (decode and "
        "colocated roles)",
        choices=SPECULATIVE_METHODS,
    )
    num_speculative_tokens: int = opt(5, "the most draft tokens a sequence scores per step", min=1, max=32)
    draft_length: str = opt(
        "adaptive",
        "adaptive: as many draft tokens as pay, by a measured step-cost model "
        "and each sequence's acceptance; fixed: all that is proposed",
        choices=DRAFT_LENGTHS,
    )
    draft_model: str | None = opt(
        None, "with --speculative draft: a smaller model with the same tokenizer (GGUF, folder or short name)"
    )
    expert_parallel: int = opt(1, "processes to split a MoE model's experts over (this one is rank 0)", min=1)
    num_redundant_experts: int = opt(0, "extra expert slots per MoE layer, for copies of hot experts", min=0)
    expert_parallel_address: str | None = opt(
        None, "HOST:PORT this worker meets expert-parallel ranks started on other hosts at (default: starts them here)"
    )
    enable_eplb: bool = opt(False, "rebalance experts over the group while serving, when the load drifts and it pays")
    eplb_interval_steps: int = opt(32, "engine steps between expert-load samples and rebalancing decisions", min=1)
    cost_profile: str | None = opt(
        None, "step costs `xllm profile` measured: the router predicts with them before this worker has run"
    )
    initial_role: str = opt(
        "decode", "mixed workers: the role it acts as until a router switches it", choices=("prefill", "decode")
    )
    offline_slowdown: float = opt(
        0.1, "beside online work, offline (job) sequences may make an engine step this much slower", min=0.0
    )
    offline_step_ms: float = opt(
        200.0, "alone, offline sequences make engine steps of at most this, which an online arrival waits", min=1.0
    )
    max_queued: int = opt(256, "requests waiting beyond the running ones before refusing (429)", min=0)
    data_host: str = opt("", "address other workers reach this one's KV data plane at (default: hostname)")
    data_port: int = opt(0, "TCP port of the KV data plane (0: any free port)", min=0, max=65535)
    metrics_port: int | None = opt(None, "serve Prometheus /metrics on this port (0: any)", min=0, max=65535)
    heartbeat_s: float = opt(1.0, "seconds between registry heartbeats", min=0.1)
    log_level: str = opt("info", "log level", choices=LOG_LEVELS)

    def validate(self) -> None:
        problem = speculation_problem(self.speculative, self.draft_model)
        if problem:
            raise ValueError(problem)

    def engine_config(self, speculate: bool = True) -> EngineConfig:
        """`speculate`: False for a role that never decodes (prefill), which then spends nothing on it."""
        return EngineConfig(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            quantization=self.quantization,
            block_size=self.block_size,
            kv_cache_memory=self.kv_cache_memory,
            kv_cache_fraction=self.kv_cache_fraction,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            step_slo_ms=self.step_slo_ms,
            min_num_batched_tokens=self.min_num_batched_tokens,
            max_model_len=self.max_model_len,
            max_encoder_tokens=self.max_encoder_tokens,
            enable_prefix_caching=self.enable_prefix_caching,
            kv_host_memory=self.kv_host_memory,
            kv_host_path=self.kv_host_path,
            num_threads=self.num_threads,
            speculative=self.speculative if speculate else "none",
            num_speculative_tokens=self.num_speculative_tokens,
            draft_length=self.draft_length,
            draft_model=self.draft_model if speculate else None,
            expert_parallel=self.expert_parallel,
            num_redundant_experts=self.num_redundant_experts,
            expert_parallel_address=self.expert_parallel_address,
            enable_eplb=self.enable_eplb,
            eplb_interval_steps=self.eplb_interval_steps,
            cost_profile=self.cost_profile,
            offline_slowdown=self.offline_slowdown,
            offline_step_ms=self.offline_step_ms,
        )
