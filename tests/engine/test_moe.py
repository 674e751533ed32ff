"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): grouped expert compute against a per-token
reference, loading, and logits and greedy tokens against transformers."""

import pytest
import torch

from shared.engine.loader import load_checkpoint
from shared.engine.moe import Experts, checkpoint_name
from tests.engine.conftest import TINY_MOE_KINDS
from tests.engine.gguf_writer import write_gguf
from tests.engine.helpers import greedy, make_engine, run_all
from tests.engine.test_reference import PROMPTS, check_against, hf_greedy


def per_token_reference(experts: Experts, x, expert_ids, weights) -> torch.Tensor:
    """The definition: each token's chosen experts' SwiGLU outputs, summed by their weights."""
    out = torch.zeros_like(x)
    size = experts.intermediate_size
    for t in range(x.shape[0]):
        for e, w in zip(expert_ids[t].tolist(), weights[t], strict=True):
            gate, up = experts.gate_up_proj[e, :size], experts.gate_up_proj[e, size:]
            h = torch.nn.functional.silu(x[t] @ gate.T) * (x[t] @ up.T)
            out[t] += w * (h @ experts.down_proj[e].T)
    return out


@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_grouped_experts_equal_the_per_token_definition(tokens):
    torch.manual_seed(tokens)
    experts = Experts(list(range(6)), hidden_size=24, intermediate_size=10)
    with torch.no_grad():
        experts.gate_up_proj.normal_()
        experts.down_proj.normal_()
    x = torch.randn(tokens, 24)
    expert_ids = torch.stack([torch.randperm(6)[:3] for _ in range(tokens)])
    weights = torch.rand(tokens, 3)
    with torch.no_grad():
        got = experts(x, expert_ids, weights)
    torch.testing.assert_close(got, per_token_reference(experts, x, expert_ids, weights), rtol=1e-4, atol=1e-4)


def test_experts_compute_only_the_slots_held_here():
    """With expert parallelism a process holds some experts (slot -1: elsewhere); the parts add up."""
    torch.manual_seed(0)
    full = Experts(list(range(6)), hidden_size=24, intermediate_size=10)
    with torch.no_grad():
        full.gate_up_proj.normal_()
        full.down_proj.normal_()
    x, weights = torch.randn(9, 24), torch.rand(9, 2)
    expert_ids = torch.stack([torch.randperm(6)[:2] for _ in range(9)])
    parts = []
    for share in ([0, 1, 2], [3, 4, 5]):
        mine = Experts(list(range(6)), 24, 10)
        mine.load_state_dict(full.state_dict())
        mine.keep_slots(share)
        local = torch.where((expert_ids >= share[0]) & (expert_ids <= share[-1]), expert_ids - share[0], -1)
        with torch.no_grad():
            parts.append(mine(x, local, weights))
    with torch.no_grad():
        torch.testing.assert_close(parts[0] + parts[1], full(x, expert_ids, weights), rtol=1e-5, atol=1e-5)


def test_mixtral_checkpoint_names_map_onto_the_shared_ones():
    assert checkpoint_name("model.layers.1.block_sparse_moe.experts.7.w1.weight") == (
        "model.layers.1.mlp.experts.7.gate_proj.weight"
    )
    assert checkpoint_name("model.layers.1.block_sparse_moe.experts.7.w2.weight").endswith("7.down_proj.weight")
    assert checkpoint_name("model.layers.1.block_sparse_moe.experts.0.w3.weight").endswith("0.up_proj.weight")
    assert checkpoint_name("model.layers.1.block_sparse_moe.gate.weight") == "model.layers.1.mlp.gate.weight"
    assert checkpoint_name("model.layers.1.mlp.gate_proj.weight") == "model.layers.1.mlp.gate_proj.weight"


@pytest.mark.parametrize("kind", TINY_MOE_KINDS)
def test_moe_config_equals_transformers_config(tiny_model_dir, tiny_hf_model, kind):
    c, ref = load_checkpoint(str(tiny_model_dir(kind))).config, tiny_hf_model(kind).config
    assert c.architecture == ref.model_type == kind
    assert c.num_experts == 8 and c.num_experts_per_tok == ref.num_experts_per_tok == 2
    assert c.norm_topk_prob == (kind != "qwen2_moe")
    assert [c.is_moe_layer(i) for i in range(c.num_hidden_layers)] == [kind != "qwen2_moe", True]
    assert c.shared_expert_intermediate_size == (48 if kind == "qwen2_moe" else 0)
    assert c.moe_intermediate_size == (128 if kind == "mixtral" else 32)


@pytest.mark.parametrize("kind", TINY_MOE_KINDS)
def test_moe_models_match_transformers(tiny_model_dir, tiny_hf_model, kind):
    ckpt = load_checkpoint(str(tiny_model_dir(kind)))
    check_against(make_engine(ckpt), tiny_hf_model(kind), ckpt.tokenizer, PROMPTS, 24)


def test_moe_batch_equals_each_sequence_alone(tiny_model_dir, tiny_hf_model):
    """Routing is per token: batching prompts together (and decoding them side by side) changes nothing."""
    ckpt = load_checkpoint(str(tiny_model_dir("qwen3_moe")))
    engine = make_engine(ckpt)
    prompts = {str(i): (ckpt.tokenizer.encode(p), greedy(16)) for i, p in enumerate(PROMPTS)}
    batched = run_all(engine, prompts)
    model = tiny_hf_model("qwen3_moe")
    for key, (ids, _) in prompts.items():
        assert batched[key][0][0] == hf_greedy(model, ids, 16), key


def test_expert_load_counts_every_routed_token(tiny_model_dir):
    ckpt = load_checkpoint(str(tiny_model_dir("mixtral")))
    engine = make_engine(ckpt)
    ids = ckpt.tokenizer.encode(PROMPTS[0])
    run_all(engine, {"a": (ids, greedy(8))})
    for layer in engine.runner.model.model.layers:
        load = layer.mlp.take_load()
        # the prompt and 7 decoded tokens (the 8th is sampled, never fed back), 2 experts each
        assert load.sum() == 2 * (len(ids) + 7) and (load > 0).sum() > 1
        assert layer.mlp.take_load().sum() == 0  # taking the load starts a new count


@pytest.mark.parametrize("kind", TINY_MOE_KINDS)
def test_moe_gguf_written_by_llama_cpp_rules_loads_back_exactly(tmp_path, tiny_model_dir, kind):
    """Stacked expert tensors split back per expert; the router, the shared expert and its gate in place;
    the MoE metadata read into the same config as the folder's."""
    folder = load_checkpoint(str(tiny_model_dir(kind)))
    write_gguf(tmp_path / "m.gguf", folder, folder.weights)
    ckpt = load_checkpoint(str(tmp_path / "m.gguf"))
    expected = {checkpoint_name(name): w for name, w in folder.weights.items()}
    assert set(ckpt.weights) == set(expected)
    for name, w in ckpt.weights.items():
        assert torch.equal(w, expected[name]), name
    got, want = vars(ckpt.config), vars(folder.config)
    for field in ("architecture", "num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        assert got[field] == want[field], field
    for field in ("norm_topk_prob", "shared_expert_intermediate_size", "qk_norm", "attention_bias"):
        assert got[field] == want[field], field
    assert [ckpt.config.is_moe_layer(i) for i in range(2)] == [folder.config.is_moe_layer(i) for i in range(2)]


def test_moe_gguf_matches_transformers(tmp_path, tiny_model_dir, tiny_hf_model):
    folder = load_checkpoint(str(tiny_model_dir("qwen2_moe")))
    write_gguf(tmp_path / "m.gguf", folder, folder.weights)
    ckpt = load_checkpoint(str(tmp_path / "m.gguf"))
    check_against(make_engine(ckpt), tiny_hf_model("qwen2_moe"), ckpt.tokenizer, PROMPTS[:2], 16)
