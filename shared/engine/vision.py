"""LLaVA's vision side: a CLIP or SigLIP vision transformer and the projector into the language model's
embedding space, named as in the checkpoints so that loading is a state-dict copy.

`LlavaVisionEncoder` turns normalized pixels (shared/images.py) into the embeddings that replace an image's
placeholder tokens, as transformers' `LlavaModel.get_image_features` does: the hidden states of
`vision_feature_layer` (an index into [embeddings, layer 1, ..., layer L], possibly negative; a list
concatenates several), less CLIP's class token under the "default" strategy, through the projector. Only the
layers up to the deepest one selected are built (as vLLM does): a checkpoint's later layers, post_layernorm and
SigLIP's pooling head are never used, and their tensors are skipped on load.
"""

import re
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from shared.llava_config import VisionConfig, llava_image_tokens, llava_text_config

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
UNUSED_LAYER = re.compile(r"vision_tower\.encoder\.layers\.(\d+)\.")


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class VisionEmbeddings(nn.Module):
    """Patches (a strided conv) plus learned positions; CLIP puts a class token first."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        if config.class_token:
            self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            bias=not config.class_token,  # CLIP's conv has no bias, SigLIP's has
        )
        self.position_embedding = nn.Embedding(config.num_patches + config.class_token, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(f"images are {tuple(pixel_values.shape[-2:])}; this tower takes {size}x{size}")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if self.config.class_token:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = (p(x).view(n, t, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch: no mask
        return self.out_proj(o.transpose(1, 2).reshape(n, t, -1))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(num_layers))


class VisionTransformer(nn.Module):
    """CLIP's (class token, pre_layrnorm) or SigLIP's vision model, first `num_layers` layers only."""

    def __init__(self, config: VisionConfig, num_layers: int):
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        if config.class_token:
            self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: HF's name
        self.encoder = Encoder(config, num_layers)

    def forward(self, pixel_values: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """[N, C, H, W] -> the hidden states at `indices` (0: the embeddings, i: after layer i), each [N, tokens,
        hidden]. Only those are kept: a deep tower's every state would hold ~50 MB per 336px image in fp32."""
        x = self.embeddings(pixel_values)
        if hasattr(self, "pre_layrnorm"):
            x = self.pre_layrnorm(x)
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers, start=1):
            x = layer(x)
            if i in indices:
                states[i] = x
        return [states[i] for i in indices]


class MultiModalProjector(nn.Module):
    def __init__(self, in_features: int, hidden_size: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaVisionEncoder(nn.Module):
    """A LLaVA's vision tower and projector: normalized pixels [N, 3, H, W] -> [N, tokens_per_image, text
    hidden], the embeddings of each image's placeholder tokens."""

    def __init__(self, raw_config: dict):
        super().__init__()
        self.config = VisionConfig.from_dict(raw_config.get("vision_config") or {})
        layers = raw_config.get("vision_feature_layer")
        layers = -2 if layers is None else layers  # LlavaConfig's default
        layers = [layers] if isinstance(layers, int) else list(layers)
        total = self.config.num_hidden_layers
        if not layers or any(not -total - 1 <= i <= total for i in layers):
            raise ValueError(f"vision_feature_layer {layers} is out of range for a tower of {total} layers")
        self.feature_layers = [i if i >= 0 else total + 1 + i for i in layers]  # indices into the hidden states
        self.strategy = raw_config.get("vision_feature_select_strategy", "default")
        self.image_tokens = llava_image_tokens(raw_config)
        if self.strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {self.strategy!r} is not supported (default, full)")
        self.image_token_id = raw_config.get("image_token_index", raw_config.get("image_token_id"))
        text_hidden = llava_text_config(raw_config)["hidden_size"]  # hub configs may leave it to Llama's default
        self.vision_tower = VisionTransformer(self.config, max(self.feature_layers))
        self.multi_modal_projector = MultiModalProjector(
            self.config.hidden_size * len(self.feature_layers),
            text_hidden,
            raw_config.get("projector_hidden_act", "gelu"),
            raw_config.get("multimodal_projector_bias", True),
        )

    @property
    def tokens_per_image(self) -> int:
        return self.image_tokens

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.vision_tower(pixel_values, self.feature_layers)
        # "default" drops the first token (CLIP's class token; transformers drops SigLIP's first patch alike)
        skip = 1 if self.strategy == "default" else 0
        features = [state[:, skip:] for state in states]
        return self.multi_modal_projector(torch.cat(features, dim=-1))

    @classmethod
    def build(
        cls, raw_config: dict, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> "LlavaVisionEncoder":
        """The encoder on `device` in `dtype`, weights loaded (built on the meta device: no memory twice)."""
        with torch.device("meta"):
            model = cls(raw_config).to(dtype)
        model = model.to_empty(device=device)
        model.load_weights(weights)
        return model.eval()

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Tensors as a LLaVA checkpoint names them: `vision_tower.*` (transformers 5) or
        `vision_tower.vision_model.*` (llava-hf on the hub), either possibly under `model.`; `multi_modal_projector.*`.
        The language model's tensors and the tower's unused ones are skipped."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights.items():
            name = name.removeprefix("model.").replace("vision_tower.vision_model.", "vision_tower.", 1)
            if self._unused(name):
                continue
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in the vision encoder")
            if params[name].shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model {tuple(params[name].shape)}")
            params[name].copy_(tensor)
            loaded.add(name)
        if missing := params.keys() - loaded:
            raise KeyError(f"checkpoint lacks vision tensors {sorted(missing)[:5]}")

    def _unused(self, name: str) -> bool:
        """The language model's (loaded elsewhere), old checkpoints' position_ids buffers, and the tower's parts
        past the deepest feature layer."""
        if name.startswith(("language_model.", "lm_head.", "vision_tower.post_layernorm.", "vision_tower.head.")):
            return True
        layer = UNUSED_LAYER.match(name)
        return name.endswith(".position_ids") or (
            layer is not None and int(layer[1]) >= len(self.vision_tower.encoder.layers)
        )
