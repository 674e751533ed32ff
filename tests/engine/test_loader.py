"""Checkpoint loading: GGUF against transformers' own GGUF loader, folders against the saved weights,
GGUF files we write (with llama.cpp's conventions) against the weights they came from."""

import json

import gguf
import numpy as np
import pytest
import torch
from torch.testing import assert_close

from shared.engine.gguf_loader import read_tensor, unpermute_qk
from shared.engine.loader import load_checkpoint
from shared.model_files import load_generation_defaults, resolve_model
from tests.engine.conftest import TINY_MODEL_KINDS
from tests.engine.gguf_writer import llama_cpp_permute, write_gguf

Q = gguf.GGMLQuantizationType
CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "bos_token_id",
)


# ---- resolve_model --------------------------------------------------------------------------------
def test_resolve_model_finds_the_default_model_by_name(smollm2_gguf):
    assert resolve_model("smollm2") == smollm2_gguf
    assert resolve_model("SmolLM2-135M-Instruct") == smollm2_gguf
    assert resolve_model(str(smollm2_gguf)) == smollm2_gguf
    assert resolve_model(str(smollm2_gguf.parent)) == smollm2_gguf  # a folder with one .gguf


def test_resolve_model_errors_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found.*smollm2.*nothing is downloaded"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"not found"):
        resolve_model("meta-llama/Llama-3.2-1B")  # a hub id: never fetched
    with pytest.raises(FileNotFoundError, match=r"no config.json and no .gguf"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"not a model"):
        resolve_model(str(tmp_path / "weights.bin"))
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"several .gguf"):
        resolve_model(str(tmp_path))


# ---- GGUF tensor types --------------------------------------------------------------------------
def _block_bound(x: np.ndarray, qtype: Q) -> np.ndarray:
    """Largest error each type's rounding allows, per element (blocks of 32 along a row)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    span = blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)
    bound = {
        Q.F32: 0 * absmax,
        Q.F16: absmax * 2**-11,
        Q.BF16: absmax * 2**-8,
        Q.Q8_0: absmax / 127 / 2,
        Q.Q4_0: absmax / 8,
        Q.Q4_1: span / 15 / 2,
    }[qtype]
    slack = 0 if qtype == Q.F32 else 1e-3 * absmax  # scales are stored as f16
    return np.broadcast_to(bound * 1.02 + slack, blocks.shape).reshape(x.shape)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_dequantize_each_type_within_its_rounding(tmp_path, qtype):
    x = np.random.default_rng(int(qtype)).standard_normal((6, 96)).astype(np.float32)  # not square
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    raw = gguf.quants.quantize(x, qtype)
    writer.add_tensor("t", raw, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = gguf.GGUFReader(str(path)).tensors
    assert tensor.tensor_type == qtype
    got = read_tensor(tensor)
    assert got.dtype == torch.float32 and tuple(got.shape) == x.shape
    err = np.abs(got.numpy() - x)
    assert (err <= _block_bound(x, qtype)).all(), f"{qtype.name}: max error {err.max():.4f}"
    if qtype not in (Q.F32,):
        assert err.max() > 0  # really went through the lossy type


def test_unpermute_inverts_llama_cpp_permute():
    w = torch.randn(3 * 16, 24)
    assert not torch.equal(llama_cpp_permute(w, 3), w)
    assert torch.equal(unpermute_qk(llama_cpp_permute(w, 3), 3), w)
    b = torch.randn(3 * 16)
    assert torch.equal(unpermute_qk(llama_cpp_permute(b, 3), 3), b)


# ---- the default model against transformers ------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_ckpt(smollm2_gguf):
    return load_checkpoint(str(smollm2_gguf))


@pytest.mark.integration
def test_smollm2_gguf_weights_equal_transformers(smollm2_ckpt, hf_smollm2):
    ref = hf_smollm2.state_dict()
    assert hf_smollm2.config.tie_word_embeddings and "lm_head.weight" not in smollm2_ckpt.weights
    assert set(smollm2_ckpt.weights) == set(ref) - {"lm_head.weight"}
    for name, w in smollm2_ckpt.weights.items():
        assert w.dtype == torch.float32 and w.device.type == "cpu"
        assert_close(w, ref[name], msg=lambda m, name=name: f"{name}: {m}")  # Q/K un-permuted like HF


@pytest.mark.integration
def test_smollm2_gguf_config_equals_transformers(smollm2_ckpt, hf_smollm2):
    c, ref = smollm2_ckpt.config, hf_smollm2.config
    assert c.architecture == ref.model_type == "llama"
    for field in (*CONFIG_FIELDS, "tie_word_embeddings"):
        assert getattr(c, field) == getattr(ref, field), field
    assert c.rope_theta == ref.rope_parameters["rope_theta"] and c.rope_scaling is None
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    # GGUF says eos=2; chat turns end with <|im_end|> (2), and <|endoftext|> (0) ends documents
    assert c.eos_token_ids[0] == ref.eos_token_id == 2 and set(c.eos_token_ids) == {0, 2}
    assert smollm2_ckpt.generation_defaults == {}


# ---- Hugging Face folders --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TINY_MODEL_KINDS)
def test_folder_weights_equal_the_saved_model(tiny_model_dir, tiny_hf_model, kind):
    model = tiny_hf_model(kind)
    ckpt = load_checkpoint(str(tiny_model_dir(kind)))
    ref = model.state_dict()
    tied = model.config.tie_word_embeddings
    assert ckpt.config.tie_word_embeddings == tied
    assert set(ckpt.weights) == set(ref) - ({"lm_head.weight"} if tied else set())
    for name, w in ckpt.weights.items():
        assert torch.equal(w, ref[name]), name
    names = list(ckpt.weights)
    assert any(".q_norm." in n for n in names) == (kind == "qwen3") == ckpt.config.qk_norm
    assert any(n.endswith("q_proj.bias") for n in names) == (kind == "qwen2") == ckpt.config.attention_bias


@pytest.mark.parametrize("kind", TINY_MODEL_KINDS)
def test_folder_config_equals_transformers_config(tiny_model_dir, tiny_hf_model, kind):
    c, ref = load_checkpoint(str(tiny_model_dir(kind))).config, tiny_hf_model(kind).config
    assert c.architecture == ref.model_type
    for field in CONFIG_FIELDS:
        # Qwen2's config has no head_dim attribute
        default = ref.hidden_size // ref.num_attention_heads if field == "head_dim" else None
        assert getattr(c, field) == getattr(ref, field, default), field
    rope = dict(ref.rope_parameters)
    assert c.rope_theta == rope.pop("rope_theta")
    assert c.rope_scaling == (None if rope["rope_type"] == "default" else rope)
    assert c.eos_token_ids[0] == 2 and 0 in c.eos_token_ids  # config's EOS first, then end-of-turn tokens
    if kind == "qwen3":
        assert c.head_dim == 32 != c.hidden_size // c.num_attention_heads


def test_llama3_rope_scaling_is_read(tiny_model_dir):
    c = load_checkpoint(str(tiny_model_dir("llama3_rope"))).config
    assert c.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    }


def test_sharded_folder_with_index(tiny_model_dir):
    path = tiny_model_dir("llama")
    shards = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) >= 2 and not (path / "model.safetensors").exists()
    ckpt = load_checkpoint(str(path))
    assert len(ckpt.weights) == 2 + 9 * ckpt.config.num_hidden_layers  # embed, norm + 9 per layer


def test_generation_defaults_and_eos_list(tiny_model_dir):
    ckpt = load_checkpoint(str(tiny_model_dir("qwen3")))
    expected = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    assert ckpt.generation_defaults == expected
    assert load_generation_defaults(str(tiny_model_dir("qwen3"))) == expected  # what the gateway applies
    assert ckpt.config.eos_token_ids == [2, 0]
    assert load_checkpoint(str(tiny_model_dir("llama"))).generation_defaults == {}


def test_dtype_is_applied(tiny_model_dir, tiny_hf_model):
    ckpt = load_checkpoint(str(tiny_model_dir("qwen2")), dtype=torch.bfloat16)
    ref = tiny_hf_model("qwen2").state_dict()
    for name, w in ckpt.weights.items():
        assert w.dtype == torch.bfloat16 and torch.equal(w, ref[name].to(torch.bfloat16)), name


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported"):
        load_checkpoint(str(tmp_path))


# ---- GGUF files written with llama.cpp's conventions -------------------------------------------
# llama3_rope: Q/K permutation + rope_freqs, tied; qwen2: biases; qwen3: q/k norms, head_dim, untied
@pytest.mark.parametrize("kind", ["llama3_rope", "qwen2", "qwen3"])
def test_gguf_written_by_llama_cpp_rules_loads_back_exactly(tmp_path, tiny_model_dir, tiny_hf_model, kind):
    folder = load_checkpoint(str(tiny_model_dir(kind)))
    ref = tiny_hf_model(kind).state_dict()
    write_gguf(tmp_path / "m.gguf", folder, ref)
    ckpt = load_checkpoint(str(tmp_path / "m.gguf"))
    assert set(ckpt.weights) == set(folder.weights)
    for name, w in ckpt.weights.items():
        assert torch.equal(w, ref[name]), name  # F32: exact, so Q/K un-permutation is exact too
    expected = {
        **vars(folder.config),
        "name": "tiny-" + folder.config.architecture,
        "bos_token_id": 1,
        "rms_norm_eps": float(np.float32(folder.config.rms_norm_eps)),
    }  # GGUF stores f32
    assert vars(ckpt.config) == expected  # rope_scaling llama3 recovered from rope_freqs too
    assert ckpt.tokenizer.encode("Hello 123 ✓") == folder.tokenizer.encode("Hello 123 ✓", False)


def test_quantized_gguf_stays_close(tmp_path, tiny_model_dir, tiny_hf_model):
    folder = load_checkpoint(str(tiny_model_dir("llama")))
    ref = tiny_hf_model("llama").state_dict()
    write_gguf(tmp_path / "q8.gguf", folder, ref, Q.Q8_0)
    ckpt = load_checkpoint(str(tmp_path / "q8.gguf"), dtype=torch.float16)
    for name, w in ckpt.weights.items():
        assert w.dtype == torch.float16
        assert_close(w.float(), ref[name], atol=ref[name].abs().max().item() / 127, rtol=0, msg=name)
