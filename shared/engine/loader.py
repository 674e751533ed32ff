"""Load a model with its weights: a GGUF file or a Hugging Face safetensors folder -> Checkpoint.

Weights come out under Hugging Face parameter names ("model.layers.0.self_attn.q_proj.weight"), so
the model loads them with a plain state-dict copy. Finding the model, its tokenizer and config are
shared/model_files.py's (no torch there). Nothing is ever downloaded.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from shared.engine.config import ModelConfig
from shared.engine.gguf_loader import load_gguf
from shared.engine.quant import QuantizedWeight
from shared.llava_config import llava_text_config
from shared.model_files import hf_tokenizer_and_config, resolve_model, sampling_defaults
from shared.tokenizer import Tokenizer, read_json


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor | QuantizedWeight]  # HF names, requested dtype, CPU; no lm_head.weight when tied
    tokenizer: Tokenizer
    generation_defaults: dict = field(default_factory=dict)
    path: str = ""
    vision_config: dict | None = None  # a LLaVA's config.json: its vision tower and projector
    vision_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # theirs, as the checkpoint names them


def load_checkpoint(name_or_path: str, dtype: torch.dtype = torch.float32, keep_blocks: bool = False) -> Checkpoint:
    """`keep_blocks`: a GGUF's tensors in the block formats the kernels run stay in them (QuantizedWeight)."""
    path = resolve_model(name_or_path)
    if path.suffix == ".gguf":
        config, weights, tokenizer = load_gguf(path, dtype, keep_blocks)
        return Checkpoint(config, weights, tokenizer, {}, str(path))
    raw, generation = read_json(path / "config.json"), read_json(path / "generation_config.json")
    tokenizer, config = hf_tokenizer_and_config(path, raw, generation)
    weights = load_safetensors(path, dtype)
    vision_config, vision_weights = None, {}
    if raw.get("model_type") == "llava":
        vision_config = raw
        weights, vision_weights = split_llava(weights)
        raw = llava_text_config(raw)
    if "tie_word_embeddings" not in raw:  # unstated: tied exactly when the file has no lm_head
        config.tie_word_embeddings = "lm_head.weight" not in weights
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # some checkpoints save the tied copy too
    defaults = sampling_defaults(generation)
    return Checkpoint(config, weights, tokenizer, defaults, str(path), vision_config, vision_weights)


def load_vision(name_or_path: str, dtype: torch.dtype = torch.float32) -> tuple[dict, dict[str, torch.Tensor], str]:
    """Only a LLaVA's vision tower and projector: (config.json, their tensors, the folder). What an encoder
    service loads: the language model's tensors are never read."""
    path = resolve_model(name_or_path)
    raw = read_json(path / "config.json") if path.is_dir() else {}
    if raw.get("model_type") != "llava":
        raise ValueError(f"model {name_or_path!r} takes no images (not a LLaVA folder): nothing to encode")
    return raw, load_safetensors(path, dtype, keep=lambda name: not _language_model(name)), str(path)


def _language_model(name: str) -> bool:
    return name.removeprefix("model.").startswith("language_model.") or name.startswith("lm_head.")


def split_llava(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LLaVA checkpoint's tensors -> (the language model's under a causal LM's names, the rest). Saved files
    spell `language_model.model.*` and `language_model.lm_head.*`; transformers 5 in memory `model.language_model.*`
    and `lm_head.*`."""
    text, vision = {}, {}
    for name, tensor in weights.items():
        if not _language_model(name):
            vision[name] = tensor
            continue
        bare = name.removeprefix("model.").removeprefix("language_model.")
        text[bare if bare.startswith(("model.", "lm_head.")) else f"model.{bare}"] = tensor
    return text, vision


def load_safetensors(
    path: Path, dtype: torch.dtype, keep: Callable[[str], bool] = lambda name: True
) -> dict[str, torch.Tensor]:
    """The tensors `keep` names (all by default) of a (possibly sharded) safetensors checkpoint, one tensor in
    memory at a time."""
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
                if name.endswith("rotary_emb.inv_freq") or not keep(name):  # old checkpoints saved that buffer
                    continue
                tensor = f.get_tensor(name)
                weights[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return weights
