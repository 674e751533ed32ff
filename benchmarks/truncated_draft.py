"""A draft model for `--speculative draft` when no smaller model with the target's tokenizer is at hand (the
case here: SmolLM2-135M is the only real model offline): some of the target's layers (self-speculative
decoding's layer skipping), its embeddings, final norm and head kept, written as a Hugging Face folder the
engine loads. `--layers 0-3,26-29` keeps the first and last four.

    PYTHONPATH=. python benchmarks/truncated_draft.py --model smollm2 --layers 0-3,26-29 --out /tmp/draft
    xllm bench engine --speculative draft --draft-model /tmp/draft
"""

import argparse
import json
from pathlib import Path

from safetensors.torch import save_file

from shared.engine.loader import load_checkpoint


def layer_list(spec: str) -> list[int]:
    """Layer numbers from a spec: "0-3,26-29" -> [0, 1, 2, 3, 26, 27, 28, 29]."""
    layers = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        layers += range(int(first), int(last or first) + 1)
    return layers


def write_truncated(model: str, layers: list[int], out: Path) -> Path:
    ckpt = load_checkpoint(model)
    cfg = ckpt.config
    if cfg.num_experts or cfg.architecture not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"only dense llama / qwen2 / qwen3 models are written here, not {cfg.architecture!r}")
    if not layers or not all(0 <= i < cfg.num_hidden_layers for i in layers):
        raise ValueError(f"--layers must be in 0..{cfg.num_hidden_layers - 1}")
    out.mkdir(parents=True, exist_ok=True)
    new_index = {old: new for new, old in enumerate(layers)}
    weights = {}
    for name, tensor in ckpt.weights.items():
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            if int(index) not in new_index:
                continue
            name = f"model.layers.{new_index[int(index)]}.{rest}"
        weights[name] = tensor.contiguous()
    save_file(weights, str(out / "model.safetensors"))
    config = {
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": len(layers),
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": cfg.eos_token_ids}))
    tok = ckpt.tokenizer
    (out / "tokenizer.json").write_text(tok.tokenizer.to_str())
    tokenizer_config = {**tok.special_tokens, "chat_template": tok.chat_template}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layers", type=layer_list, required=True, help="layers to keep: 0-3,26-29")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(write_truncated(args.model, args.layers, args.out))


if __name__ == "__main__":
    main()
